"""Reports of runs: ``summary.md`` (Markdown tables) and a self-contained HTML report with plots.

- :func:`write_summary` - ``summary.md`` of one run (written by the pipeline after every run);
- :func:`write_report` - ``report.html`` + ``report.md`` over one or more runs (figures, tables,
  environment); :func:`build_report` gives the same content as data;
- :func:`pareto_points` - accuracy-vs-FLOPs points of runs with the Pareto front marked;
- :func:`collect_environment` - package versions, CPU, CUDA device and date;
- :mod:`vitopt.report.jetson` - the Jetson kit's ``results.json`` as a measurement source.

Matplotlib is imported only when a figure is drawn, so importing this package stays cheap.
"""

from vitopt.report import jetson as _jetson
from vitopt.report.environment import collect_environment
from vitopt.report.html import SECTIONS, Report, build_report, render_html, render_markdown, write_report
from vitopt.report.plots import ParetoPoint, RunData, load_run, load_runs, pareto_points
from vitopt.report.summary import render_summary, write_summary

_jetson.register()  # device results.json (deploy/jetson kit) beside the host's validate numbers

__all__ = ["write_report", "build_report", "render_html", "render_markdown", "Report", "SECTIONS",
           "pareto_points", "ParetoPoint", "load_run", "load_runs", "RunData", "collect_environment",
           "write_summary", "render_summary"]
