"""What a person looks at: the live page (GET /) and the post-mortem report (``trainhealth report``).

Both are server-rendered HTML with the same small script (assets/charts.js: plain SVG charts, one line
per rank, alerts marked on the curves) and the same chart data (chart.py). Pure: nothing here does I/O
but reading the package's own assets; the routes are in http/page.py, the command in cli.py.
"""
