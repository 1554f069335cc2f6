"""A report as a list of blocks (headings, text, tables, figures), written as Markdown beside its figures and as
one self-contained HTML file (figures embedded, no external asset)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    """A PNG file in the report's folder, with its caption; tiles sit side by side."""

    path: Path
    caption: str
    tile: bool = False


Block = Heading | Text | Table | Figure


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown(blocks: list[Block], folder: Path) -> str:
    """The report as Markdown; figures are linked relative to `folder` (where report.md lives)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines += ["| " + " | ".join(map(_cell, block.header)) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in block.rows] + [""]
        else:
            lines += [f"![{block.caption}]({block.path.relative_to(folder).as_posix()})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #bbb;padding:.25rem .6rem;text-align:left}
th{background:#eee}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #ccc}
figure.tile{display:inline-block;vertical-align:top;width:14rem;margin:.4rem}figure.tile img{width:100%}
figcaption{font-size:.9rem;color:#555}"""


def html_page(blocks: list[Block], title: str) -> str:
    """The report as one HTML page with its figures embedded as data URIs."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(cell)}</th>" for cell in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(block.path.read_bytes()).decode()
            caption = html.escape(block.caption)
            kind = ' class="tile"' if block.tile else ""
            body.append(f'<figure{kind}><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}'
                        "</figcaption></figure>")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
