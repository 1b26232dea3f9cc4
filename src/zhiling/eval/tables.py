"""One small table type that renders to the terminal (rich), Markdown and HTML, so every eval output shows the
same numbers the same way."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any


def fmt(value: Any, percent: bool = True) -> str:
    """Scores in [0, 1] print as percentages with one decimal; other numbers as they are; None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value * 100:.1f}" if percent else f"{value:.2f}"
    return str(value)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""
    text_columns: int = 1  # the first N columns hold text (left-aligned); the rest numbers (right-aligned)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def to_rich(self):
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, caption=self.note or None)
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index < self.text_columns else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def to_markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [f"### {self.title}", "", "| " + " | ".join(map(cell, self.columns)) + " |",
                 "|" + "|".join(" --- " if i < self.text_columns else " ---: " for i in range(len(self.columns))) + "|"]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return (f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>{note}")


def print_tables(tables: list[Table]) -> None:
    from rich.console import Console

    console = Console()
    for table in tables:
        console.print(table.to_rich())


def markdown_document(title: str, tables: list[Table], intro: str = "") -> str:
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += [t.to_markdown() for t in tables]
    return "\n".join(parts)
