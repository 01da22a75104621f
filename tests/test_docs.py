"""The docs hold together: every relative link in README.md and docs/ points at a file that
exists and, with an anchor, at a heading of that file; the README links every docs page."""
import re

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page) -> set:
    in_code, out = False, set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def links(page):
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            yield from LINK.findall(line)


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):          # http(s)://, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    assert len(readme.splitlines()) <= 200


def fenced(page, language: str) -> list[str]:
    """The code blocks of ``page`` fenced as ```language."""
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.S | re.M)


def test_distributed_launch_manifests_parse_and_run_our_command():
    """docs/distributed.md's Kubeflow TFJob (YAML) and Vertex AI custom job (JSON): valid,
    with the fields their APIs require, launching `python -m tfpretrain.fit` on a shared
    run folder."""
    import json

    import yaml

    from tfpretrain.config import load_config
    from tfpretrain.fit import parser as fit_parser

    page = REPO / "docs" / "distributed.md"
    (tfjob,) = [yaml.safe_load(b) for b in fenced(page, "yaml") if "kind: TFJob" in b]
    assert tfjob["apiVersion"] == "kubeflow.org/v1" and tfjob["metadata"]["name"]
    (worker,) = tfjob["spec"]["tfReplicaSpecs"].values()
    assert worker["replicas"] >= 2 and worker["restartPolicy"] == "ExitCode"
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow"  # the operator looks for this name
    command = container["command"]
    assert command[:3] == ["python", "-m", "tfpretrain.fit"]
    assert "--run-dir" in command and container["volumeMounts"]
    # ExitCode retries only 130, 137, 138 and 143 (kubeflow/common's IsRetryableExitCode):
    # a lost or stopped peer must exit with one of them, a bad config with none
    args = fit_parser().parse_args(command[3:])
    cfg = load_config(args.config, args.overrides)
    assert cfg.train.rerun_exit_code in (130, 137, 138, 143)

    (job,) = [json.loads(b) for b in fenced(page, "json") if "workerPoolSpecs" in b]
    pools = job["jobSpec"]["workerPoolSpecs"]
    assert job["displayName"] and len(pools) >= 2
    for pool in pools:
        assert pool["replicaCount"] >= 1 and pool["machineSpec"]["machineType"]
        spec = pool["containerSpec"]
        assert spec["imageUri"] and spec["command"] == ["python", "-m", "tfpretrain.fit"]
        run_dir = spec["args"][spec["args"].index("--run-dir") + 1]
        assert run_dir.startswith("/gcs/")  # Cloud Storage FUSE: every replica sees it


# --- every documented command -------------------------------------------------------------
# tfpretrain.<module> whose first argument is a sub-command
SUBCOMMANDS = {"bench", "synth"}


def commands(page) -> list[tuple[int, str]]:
    """(page, command) of every ``python -m tfpretrain.…`` line of the page's code blocks
    (``$ `` prompts allowed), continuation lines joined, comments and the text after
    ``&&``/``|``/``>`` dropped."""
    out = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), re.S | re.M):
        if lang not in ("", "bash", "sh", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            m = re.match(r"\s*(?:\$ )?python -m (tfpretrain[\w.]*)(.*)", line)
            if m:
                args = re.split(r"\s(?:&&|\||>|2>|#)\s", m.group(2) + " ")[0]
                out.append((page, f"{m.group(1)} {args}".strip()))
    return out


def expected_exit(page, command: str) -> int:
    """A command's exit status as its page states it (``# exits N`` after it), else 0."""
    command = " ".join(command.split())
    for line in page.read_text().splitlines():
        m = re.search(r"#\s*exits (\d+)", line)
        if m and command in " ".join(line.split()):
            return int(m.group(1))
    return 0


def documented_commands() -> list:
    return [c for page in PAGES for c in commands(page)]


def _flags(command: str) -> tuple[str, list[str]]:
    """(the module, and its sub-command if any, as argv prefix; the --flags used)."""
    import shlex

    parts = shlex.split(command)
    module, rest = parts[0], parts[1:]
    prefix = [module]
    name = module.split(".")[-1]
    if name in SUBCOMMANDS and rest and not rest[0].startswith("-"):
        prefix.append(rest[0])
    return " ".join(prefix), [a.split("=")[0] for a in rest if a.startswith("--")]


def test_every_documented_command_and_flag_exists():
    """Each ``python -m tfpretrain.X [sub] --flag`` in README.md and docs/ names a module that
    exists and flags its ``--help`` lists (docs cannot drift from the argument parsers)."""
    import contextlib
    import importlib
    import io

    wanted: dict[str, set] = {}
    for page, command in documented_commands():
        prefix, flags = _flags(command)
        wanted.setdefault(prefix, set()).update(flags)
    assert len(wanted) >= 15
    missing = []
    for prefix, flags in sorted(wanted.items()):
        module, *sub = prefix.split()
        mod = importlib.import_module(module)
        if not hasattr(mod, "main"):  # a package run as python -m: its __main__
            mod = importlib.import_module(module + ".__main__")
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            mod.main([*sub, "--help"])
        missing += [f"{prefix} {f}" for f in sorted(flags)
                    if not re.search(rf"{re.escape(f)}(?![\w-])", text.getvalue())]
    assert not missing, "documented flags the commands do not have:\n" + "\n".join(missing)
