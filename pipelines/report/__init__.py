"""The run report: ``OUTPUT/report.html`` (self-contained) and ``OUTPUT/report/*.png``.

Reads only what a run wrote (stats.json, manifest.json, the scores parquet, the tars): it imports
the run core and the I/O formats, never a model or Ray.

    sections.py  the page, section by section       data.py    stats, scores scan, sample choice
    plots.py     matplotlib figures                  html.py    markup helpers
    samples.py   finding a row's image (also used by ``shardsmith inspect``)
"""

from shardsmith.pipelines.report.data import ReportError
from shardsmith.pipelines.report.sections import build_report, report_after_run, thumbnail

__all__ = ["build_report", "report_after_run", "ReportError", "thumbnail"]
