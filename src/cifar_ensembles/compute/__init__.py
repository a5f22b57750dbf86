"""Where and how tensors are computed: device choice, autocast and memory format (`device`),
claiming one GPU among several for a job (`gpu_claim`), and batched inference (`inference`).

May import: `errors`, `config`, `transforms`.
"""
