"""Every file the workflow reads or writes, and how: atomic writes (`atomic`); untrusted input
read without running code and without writing outside its folder (`safe_pickle`,
`safe_archive`, `raw_data`, `weights`, and `ood_data` for the OOD sets); the prepared dataset
(`splits`); and the files the stages write and read back, split by what writes them
(`training_run`, `ensemble_summary`, `shift_summary`, `ood_summary`, `frontier_summary`,
`arrays`), on the shared error plumbing of `records`.

May import: `errors`, `config`, `transforms.corruptions` (the severities of a shift set),
`analysis.uncertainty` (the scores and metrics an ood.json must hold), `analysis.methods`
(the method names a methods.json may hold), `models` (to check
weights load); never a stage.
"""
