"""The report's document: HTML body and Markdown text built side by side (Doc), the page's CSS, and the
number formats every section shares."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np



class Doc:
    """Builds the HTML body and the Markdown text side by side."""

    def __init__(self, figures: Path):
        self.html: list[str] = []
        self.md: list[str] = []
        self.figures = figures

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str, cls: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def open_section(self, ident: str) -> None:
        self.html.append(f'<section id="{ident}">')

    def close_section(self) -> None:
        self.html.append("</section>")

    def open_fold(self, title: str) -> None:
        """A folded block (<details>) under a heading-like summary; the Markdown twin gets a heading."""
        self.html.append(f'<details class="fold"><summary>{html.escape(title)}</summary>')
        self.md.append(f"\n## {title}\n")

    def close_fold(self) -> None:
        self.html.append("</details>")

    def table(self, header: list[str], rows: list[list], caption: str = "") -> None:
        cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""  # wraps to the window, not the table
        self.html.append(f'<div class="table">{cap}<div class="scroll"><table><thead><tr>{cells}</tr></thead>'
                         f'<tbody>{body}</tbody></table></div></div>')
        if caption:
            self.md.append(f"*{caption}*\n")
        self.md.append("| " + " | ".join(map(str, header)) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md.extend("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows)
        self.md.append("")

    def image(self, png: bytes, name: str, alt: str, width: int | None = None, cls: str = "") -> None:
        self.figures.mkdir(parents=True, exist_ok=True)
        (self.figures / name).write_bytes(png)
        w = f' style="max-width:{width}px"' if width else ""
        c = f' class="{cls}"' if cls else ""
        self.html.append(f'<figure><img alt="{html.escape(alt)}"{c}{w} src="data:image/png;base64,'
                         f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(alt)}</figcaption></figure>')
        self.md.append(f"![{alt}](figures/{name})\n")

    def raw_details(self, title: str, text: str) -> None:
        self.html.append(f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>")
        self.md.append(f"<details><summary>{title}</summary>\n\n```json\n{text}\n```\n</details>\n")

    def open_row(self) -> None:
        self.html.append('<div class="row">')

    def close_row(self) -> None:
        self.html.append("</div>")


CSS = """*{box-sizing:border-box}body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;
margin:16px auto;max-width:1180px;color:#222;line-height:1.4;padding:0 16px}h1{border-bottom:2px solid #446;
padding-bottom:6px;font-size:1.6em;margin:8px 0 10px;overflow-wrap:anywhere}h2{margin-top:30px;border-bottom:1px solid #ccc;
padding-bottom:3px}#verdict h2{margin-top:10px}#details>h2:first-child{border:0;margin:40px 0 0;color:#446;font-size:1em;
text-transform:uppercase;letter-spacing:.08em}p.verdict{font-size:17px;background:#f3f5fb;border-left:4px solid #446;
padding:8px 12px;margin:8px 0}.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:2px 0 14px;
font-size:13px}th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}td{white-space:nowrap}th{background:#eef}
td:first-child,th:first-child{text-align:left}p.caption{font-weight:600;font-size:13px;margin:10px 0 2px}
figure{display:inline-block;margin:6px 10px 12px 0;vertical-align:top;max-width:100%}figcaption{font-size:12px;color:#555;
max-width:520px}img{border:1px solid #ddd;max-width:100%;height:auto}img.tiles{image-rendering:pixelated}
pre{background:#f6f6f8;padding:8px;font-size:12px;overflow-x:auto}details{margin:4px 0}summary{cursor:pointer}
details.fold>summary{font-size:1.3em;font-weight:600;margin-top:30px;border-bottom:1px solid #ccc}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}.row>figure{min-width:0}.note{color:#555;font-size:13px}
@media (max-width:640px){body{padding:0 8px;margin:8px auto}h1{font-size:1.25em}p.verdict{font-size:15px}
table{font-size:12px}th,td{padding:3px 5px}figure{margin:4px 0 8px}}"""


def fmt(x, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def ci(m: dict, nd: int = 3) -> str:
    if m["n"] < 2:
        return f"{fmt(m['mean'], nd)} (n=1)"
    return f"{fmt(m['mean'], nd)} [{fmt(m['ci95'][0], nd)}, {fmt(m['ci95'][1], nd)}]"


def rate(block: dict | None) -> str:
    if not block or block.get("fidelity") is None:
        return "–"
    lo, hi = block["ci95"]
    return f"{block['fidelity']:.3f} [{lo:.3f}, {hi:.3f}]"


ARM_HEADER = ["arm", "added images (synthetic or pseudo-labelled)", "accuracy", "macro-F1", "Δ accuracy vs real", "Δ macro-F1 vs real",
              "Δ accuracy vs classic"]


def arm_rows(r: dict) -> list[list]:
    """Rows of ARM_HEADER for one test set of metrics.json (mean [95% CI]; deltas paired against real, and of
    the synthetic arms against classic augmentation, which they train with; classic_aa's is its noise floor)."""
    rows = []
    for arm, v in r["arms"].items():
        d = r["deltas_vs_real"].get(arm)
        c = ((r.get("noise_floors") if arm == "classic_aa" else r.get("deltas_vs_classic")) or {}).get(arm)
        rows.append([f"{arm} (A/A noise floor)" if arm in ("real_aa", "classic_aa") else arm,
                     sum(v.get("n_synthetic", {}).values()), ci(v["accuracy"]), ci(v["macro_f1"]),
                     ci(d["accuracy"]) if d else "–", ci(d["macro_f1"]) if d else "–",
                     ci(c["accuracy"]) if c else "–"])
    return rows
