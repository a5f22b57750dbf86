# Stage 5: ensembles per experiment (votes, subsets, greedy selection, calibration, CIs;
# the size is chosen on validation) and paired tests between experiments.


rule ensemble:
    input:
        data=DATA,
        val=member_files("probs_{split}.npy", "val"),
        test=member_files("probs_{split}.npy", "test"),
    output:
        csv="results/{experiment}/ensemble.csv",
        json="results/{experiment}/ensemble.json",
    params:
        seeds=lambda wc: " ".join(str(s) for s in seeds(wc.experiment)),
        spec=to_json(SPEC.ensemble),
    log:
        "logs/ensemble/{experiment}.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles ensemble --data {input.data} --seeds {params.seeds} --val {input.val} "
        "--test {input.test} --spec {params.spec:q} --csv {output.csv} --json {output.json} 2> {log}"


rule compare:
    input:
        data=DATA,
        probs=flat(test_probs()),
    output:
        "results/comparisons.json",
    params:
        experiments=json.dumps(test_probs()),
    log:
        "logs/ensemble/compare.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles compare --data {input.data} --experiments {params.experiments:q} "
        "--out {output} 2> {log}"
