"""matplotlib, headless: the one place plots get their pyplot (runs, tune, lr_find,
schedule)."""
from __future__ import annotations

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


def save(fig, path) -> None:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
