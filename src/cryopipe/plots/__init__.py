"""Plots written by the jobs (PNG/PDF), as bare matplotlib ``Figure`` objects rendered by Agg: no pyplot, no
backend switch, so importing cryopipe in a notebook changes nothing. One module a job."""
