# Stage 2: one data.npz with a stratified validation split carved from the training set.


rule prepare:
    input:
        "resources/{dataset}/raw",
    output:
        "resources/{dataset}/data.npz",
    params:
        val_size=config["data"]["val_size"],
        split_seed=config["data"]["split_seed"],
        train_subset=optional_arg("--train-subset", config["data"].get("subset", {}).get("train")),
        test_subset=optional_arg("--test-subset", config["data"].get("subset", {}).get("test")),
    log:
        "logs/prepare/{dataset}.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles prepare --dataset {wildcards.dataset} --raw {input} --out {output} "
        "--val-size {params.val_size} --split-seed {params.split_seed} "
        "{params.train_subset} {params.test_subset} 2> {log}"
