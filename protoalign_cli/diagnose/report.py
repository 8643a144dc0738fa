"""report.json and report.md of ``protoalign diagnose``: the run summary, and the same for people."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from protoalign_cli.diagnose.results import DiagnoseResults


def join_sections(sections: Sequence[list[str]]) -> list[str]:
    """The non-empty sections, each without trailing blank lines, one blank line between them."""
    lines: list[str] = []
    for section in sections:
        section = list(section)
        while section and not section[-1]:
            section.pop()
        if section:
            lines += ([""] if lines else []) + section
    return lines


def header_lines(summary: dict, results: DiagnoseResults) -> list[str]:
    """The title and the inputs: prototypes, target, models, settings, command line."""
    inputs = summary["inputs"]
    finetuned = (f"`{inputs['model']}` (sha256 {inputs['model_sha256'][:12]}...), head {inputs['model_head']}"
                 if inputs["model"] else "none")
    return [
        "# protoalign diagnose report", "",
        f"- prototypes: `{inputs['prototypes']}` (sha256 {inputs['prototypes_sha256'][:12]}...)",
        f"- target: {', '.join(f'`{c}`' for c in inputs['configs'])} ({results.n_configs} configurations, "
        f"{results.n_atoms} atoms)",
        f"- pretrained model: `{inputs['foundation_model']}` (sha256 {inputs['foundation_model_sha256'][:12]}...), "
        f"head {inputs['head']}",
        f"- fine-tuned model: {finetuned}",
        f"- energy key: {inputs['energy_key']}; radius factor {inputs['radius_factor']:g}; spread threshold "
        f"{inputs['spread_threshold_meV']:g} meV",
        f"- command: `{summary['command_line']}`",
    ]


def render_markdown(summary: dict, results: DiagnoseResults) -> str:
    """The report as Markdown: inputs, verdict, the diagnostics' sections in registry order, figures."""
    sections = [
        header_lines(summary, results),
        ["## Verdict", "", "```", *results.verdict, "```"],
        *(part.markdown() for part in results.parts.values()),
    ]
    figures = ["## Figures", "", *(f"![{name}]({name})" for name in results.figures)]
    return "\n".join(join_sections(sections) + [""] + figures) + "\n"


def write_report(folder: Path, summary: dict, results: DiagnoseResults) -> None:
    """Write ``report.json`` (the run summary, ``results`` included) and ``report.md`` into ``folder``."""
    from protoalign_cli.io.provenance import write_summary

    write_summary(folder / "report.json", {**summary, "results": results.to_json()})
    (folder / "report.md").write_text(render_markdown(summary, results))
