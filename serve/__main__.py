"""`python -m serve [flags]`: the web app (serve/app.py)."""

from serve.app import main

main()
