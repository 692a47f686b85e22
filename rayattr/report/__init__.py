"""`rayattr report`: a static, self-contained HTML report of a scored run, to read its attributions offline.

``writer`` ranks and reads, ``pages`` and ``html`` render; ``run`` and ``summary`` say what the run
recorded, ``rankings`` and ``texts`` what each query's page shows.
"""

from __future__ import annotations

from rayattr.report.writer import write_report

__all__ = ["write_report"]
