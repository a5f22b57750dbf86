# Stage 3: one training job per (experiment, seed). The checkpoint is not an output, so a
# killed or failed job keeps it and the rerun resumes from it.


rule train:
    input:
        data=DATA,
        weights=lambda wc: [WEIGHTS] if uses_pretrained(wc.experiment) else [],
    output:
        model="results/{experiment}/seed{seed}/model.pt",
        history="results/{experiment}/seed{seed}/history.csv",
        run="results/{experiment}/seed{seed}/run.yaml",
    params:
        spec=lambda wc: training_params(wc.experiment),
        out_dir=lambda wc: run_dir(wc.experiment, wc.seed),
        checkpoint=lambda wc: f"{run_dir(wc.experiment, wc.seed)}/checkpoint.pt",
        weights=lambda wc, input: f"--weights {input.weights}" if input.weights else "",
    log:
        "logs/train/{experiment}/seed{seed}.log",
    benchmark:
        "results/{experiment}/seed{seed}/benchmark.tsv"
    threads: 4
    resources:
        gpu=1,
        # A GPU has 8 slots; a job takes 8 / jobs_per_gpu of them (training.jobs_per_gpu:
        # 1, 2, 4 or 8), so `--resources gpu_slots=8` per GPU runs jobs_per_gpu seeds on each.
        gpu_slots=lambda wc: 8 // int(training_spec(wc.experiment).get("jobs_per_gpu", 1)),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles train --data {input.data} --spec {params.spec:q} --seed {wildcards.seed} "
        "--out-dir {params.out_dir} --checkpoint {params.checkpoint} --threads {threads} "
        "--name {wildcards.experiment}/seed{wildcards.seed} --gpu-slots {resources.gpu_slots} "
        "{params.weights} 2> {log}"
