"""The figures every fault and attack test reports, printed as one table at the end of the run."""

from __future__ import annotations

from dataclasses import dataclass

HEADER = ("fault or attack", "tried", "acknowledged", "lost", "5xx")


@dataclass(frozen=True)
class Row:
    """One fault or attack: how many requests were tried, acknowledged, lost, and answered 5xx."""

    name: str
    tried: int
    acknowledged: int
    lost: int
    server_errors: int


ROWS: list[Row] = []
LINES: list[str] = []


def report(name: str, tried: int, acknowledged: int, lost: int, server_errors: int, line: str) -> None:
    """Record a row for the table and print the test's one summary line."""
    ROWS.append(Row(name, tried, acknowledged, lost, server_errors))
    LINES.append(line)
    print(f"\n{line}")


def table(rows: list[Row]) -> list[str]:
    """Return the rows as a Markdown table, one line each."""
    cells = [
        HEADER,
        *[(r.name, str(r.tried), str(r.acknowledged), str(r.lost), str(r.server_errors)) for r in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]

    def line(row: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return [line(cells[0]), rule, *(line(row) for row in cells[1:])]
