# Stage 3: one training job per (experiment, seed). The checkpoint is not an output, so a
# killed or failed job keeps it and the rerun resumes from it.


rule train:
    wildcard_constraints:
        experiment=experiments_pattern(keep=False),
    input:
        data=DATA,
        weights=lambda wc: [WEIGHTS] if uses_pretrained(wc.experiment) else [],
    output:
        model="results/{experiment}/seed{seed}/model.pt",
        history="results/{experiment}/seed{seed}/history.csv",
        run="results/{experiment}/seed{seed}/run.yaml",
    params:
        # what the model learns: changing it retrains (and it is all that does)
        result=lambda wc: training_params(wc.experiment),
        out_dir=lambda wc: run_dir(wc.experiment, wc.seed),
        checkpoint=lambda wc: f"{run_dir(wc.experiment, wc.seed)}/checkpoint.pt",
        weights=lambda wc, input: f"--weights {input.weights}" if input.weights else "",
    log:
        "logs/train/{experiment}/seed{seed}.log",
    benchmark:
        "results/{experiment}/seed{seed}/benchmark.tsv"
    threads: 4
    # Training is the long pole: whenever a core (or GPU slot) frees up, a training job goes
    # first, and the short prediction and analysis jobs fill in around it.
    priority: 10
    resources:
        gpu=1,
        # A GPU has 8 slots; a job takes 8 / runtime.jobs_per_gpu of them (1, 2, 4 or 8 jobs
        # per GPU), so `--resources gpu_slots=8` per GPU runs jobs_per_gpu seeds on each.
        gpu_slots=lambda wc: gpu_slots(wc.experiment),
        # the whole training spec (params.result is what decides the result: a field it leaves
        # out, e.g. Adam's betas under SGD, reruns nothing) and the runtime spec (how fast):
        # resources, not params, so that Snakemake does not compare them
        training_spec=lambda wc: training_spec(wc.experiment),
        runtime_settings=lambda wc: runtime_settings(wc.experiment),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles train --data {input.data} --spec {resources.training_spec:q} "
        "--runtime {resources.runtime_settings:q} --seed {wildcards.seed} --out-dir {params.out_dir} "
        "--checkpoint {params.checkpoint} --threads {threads} "
        "--name {wildcards.experiment}/seed{wildcards.seed} {params.weights} 2> {log}"


# Runs that keep snapshots or an SWA average also write members.pt. A rule of their own, so
# that members.pt is an output only where a run writes it: runs trained before it existed
# stay finished.
use rule train as train_keeping_members with:
    wildcard_constraints:
        experiment=experiments_pattern(keep=True),
    output:
        model="results/{experiment}/seed{seed}/model.pt",
        history="results/{experiment}/seed{seed}/history.csv",
        run="results/{experiment}/seed{seed}/run.yaml",
        members="results/{experiment}/seed{seed}/members.pt",
