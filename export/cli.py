"""Pieces the two command lines share: argparse built from option dataclasses, logging, result tables."""
from __future__ import annotations

import argparse
import logging
from dataclasses import MISSING, fields


def add_dataclass_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One --flag per field of `cls`, its help and choices taken from the field's metadata."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if isinstance(f.default, bool):
            group.add_argument(flag, action="store_true", help=help_)
        else:
            default = None if f.default is MISSING else f.default
            group.add_argument(flag, type=type(default), default=default, choices=f.metadata.get("choices"),
                               required=f.metadata.get("required", False), metavar=f.metadata.get("metavar"),
                               help=help_ if default in ("", None) else f"{help_} (default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (the summary the CLIs print)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def parity_cells(report: dict | None) -> dict:
    """The two summary columns: parity (max |dlogits|, greedy identical), or an int8 export's quality (how far
    its held-out loss is from fp32's, greedy characters identical)."""
    if not report:
        return {"max|dlogits|": "-", "greedy": "-"}
    if report.get("judged") is False:
        return {"max|dlogits|": "not judged", "greedy": "-"}
    if "delta_nats" in report:
        return {"max|dlogits|": f"dloss {report['delta_nats']:+.4f}",
                "greedy": f"{report['greedy_identical_chars']}/{report['greedy_chars']}"}
    return {"max|dlogits|": f"{report['max_abs_logits']:.1e}",
            "greedy": "identical" if report["greedy_identical"] else "DIVERGED"}
