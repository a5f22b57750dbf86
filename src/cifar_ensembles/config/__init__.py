"""The config, resolved once: typed, frozen specs of every section (`spec`), their conversion
from and to JSON with one-line errors (`typed`), and the checks that run before any job
(`check`).

May import: `errors` only. Everything else imports from here; nothing here imports torch,
so Snakemake can load it at parse time.
"""
