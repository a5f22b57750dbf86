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
        method=config["ensemble"]["method"],
        max_subsets=config["ensemble"]["max_subsets"],
        subset_seed=config["ensemble"]["subset_seed"],
        bootstrap=config["ensemble"]["bootstrap"],
        bootstrap_seed=config["ensemble"]["bootstrap_seed"],
        ece_bins=config["ensemble"]["ece_bins"],
    log:
        "logs/ensemble/{experiment}.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles ensemble --data {input.data} --seeds {params.seeds} --val {input.val} "
        "--test {input.test} --method {params.method} --max-subsets {params.max_subsets} "
        "--subset-seed {params.subset_seed} --bootstrap {params.bootstrap} "
        "--bootstrap-seed {params.bootstrap_seed} --ece-bins {params.ece_bins} "
        "--csv {output.csv} --json {output.json} 2> {log}"


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
