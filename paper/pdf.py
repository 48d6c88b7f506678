"""A small Markdown -> PDF renderer on fpdf2 (pure pip: no LaTeX, no system packages).

It understands what report.md uses: ``#``/``##``/``###`` headings, paragraphs with **bold** and *italic*, ``-``
bullet lists, pipe tables, fenced code blocks and ``![caption](image.png)`` figures. Fonts are the DejaVu faces
matplotlib ships, so any Unicode in the text (±, ×, ≤) renders.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
from fpdf import FPDF
from fpdf.fonts import FontFace

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
IMAGE = re.compile(r"^!\[(?P<caption>.*)\]\((?P<path>[^)]+)\)\s*$")


class Report(FPDF):
    def __init__(self, title: str):
        super().__init__(format="A4")
        self.title_text = title
        for style, suffix in (("", ""), ("B", "-Bold"), ("I", "-Oblique"), ("BI", "-BoldOblique")):
            self.add_font("sans", style, str(FONT_DIR / f"DejaVuSans{suffix}.ttf"))
            self.add_font("mono", style, str(FONT_DIR / f"DejaVuSansMono{suffix}.ttf"))
        self.set_margins(18, 16, 18)
        self.set_auto_page_break(True, margin=16)
        self.figure_no = 0

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("sans", "", 8)
        self.set_text_color(120)
        self.cell(0, 6, f"{self.title_text} · {self.page_no()}", align="C")
        self.set_text_color(0)


def _inline(text: str) -> str:
    """fpdf2's markdown=True knows **bold** and __italic__; map *italic* and drop `code` ticks."""
    text = re.sub(r"(?<![*\w])\*(?!\*)([^*]+?)\*(?!\*)", r"__\1__", text)
    return text.replace("`", "")


def render(markdown: str, pdf_path: Path, base_dir: Path, title: str) -> Path:
    pdf = Report(title)
    pdf.add_page()
    lines = markdown.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            pdf.set_font("sans", "", 9.5)
            pdf.multi_cell(0, 5, _inline(" ".join(para)), markdown=True, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
            para.clear()

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            size = {1: 17, 2: 13, 3: 11}.get(level, 10)
            pdf.ln(2 if level > 1 else 0)
            pdf.set_font("sans", "B", size)
            pdf.multi_cell(0, size * 0.5, line.lstrip("#").strip(), new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1.5)
        elif line.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            pdf.set_font("mono", "", 7.5)
            pdf.set_fill_color(244, 244, 244)
            pdf.multi_cell(0, 3.8, "\n".join(block), fill=True, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            i -= 1
            _table(pdf, rows)
        elif m := IMAGE.match(line):
            flush()
            pdf.figure_no += 1
            path = base_dir / m["path"]
            width = pdf.epw
            if pdf.will_page_break(width * 0.62):
                pdf.add_page()
            pdf.image(str(path), w=width)
            pdf.set_font("sans", "I", 8.5)
            pdf.multi_cell(0, 4.2, _inline(f"Figure {pdf.figure_no}. {m['caption']}"), markdown=True,
                           new_x="LMARGIN", new_y="NEXT")  # fmt: skip
            pdf.ln(3)
        elif re.match(r"^\s*[-*] ", line):
            flush()
            pdf.set_font("sans", "", 9.5)
            item = line.split(" ", 1)[1].strip() if line.lstrip().startswith(("-", "*")) else line
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") and lines[i + 1].strip():
                i += 1
                item += " " + lines[i].strip()
            pdf.set_x(pdf.l_margin + 3)
            pdf.multi_cell(0, 5, _inline("•  " + item), markdown=True, new_x="LMARGIN", new_y="NEXT")
        else:
            para.append(line.strip())
        i += 1
    flush()
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(pdf_path))
    return pdf_path


def _table(pdf: FPDF, rows: list[list[str]]) -> None:
    if not rows:
        return
    n = max(len(r) for r in rows)
    rows = [r + [""] * (n - len(r)) for r in rows]
    # Column widths follow the longest cell of each column, within bounds.
    words = [max(len(w) for r in rows for w in (r[j].split() or [""])) for j in range(n)]
    mean = [sum(len(r[j]) for r in rows) / len(rows) for j in range(n)]
    weights = [max(words[j] + 2, min(mean[j], 48)) for j in range(n)]
    total = sum(weights)
    widths = [pdf.epw * w / total for w in weights]
    pdf.set_font("sans", "", 7.5 if n > 4 else 8.5)
    head = FontFace(emphasis="BOLD", fill_color=(232, 236, 242))
    with pdf.table(col_widths=widths, headings_style=head, line_height=4.2, text_align="LEFT",
                   markdown=True, first_row_as_headings=True) as table:  # fmt: skip
        for r in rows:
            row = table.row()
            for cell in r:
                row.cell(_inline(cell))
    pdf.ln(3)
