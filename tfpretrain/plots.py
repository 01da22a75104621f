"""matplotlib, headless: the one place plots get their pyplot (runs, tune, lr_find,
schedule)."""
from __future__ import annotations

from pathlib import Path

from tfpretrain.errors import UserError


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'tfpretrain[plot]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_path(value, flag: str) -> Path:
    """A ``.png`` path given on the command line (``flag`` names the option), checked
    before any work: matplotlib would otherwise append ``.png`` to another name silently."""
    path = Path(value)
    if path.suffix.lower() != ".png":
        raise UserError(f"{flag} must name a .png file. Received: {value}")
    return path


def save(fig, path) -> None:
    """``fig`` as a PNG at ``path``, its folder created if needed."""
    plt = pyplot()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
