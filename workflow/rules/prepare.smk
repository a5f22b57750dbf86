# Stage 2: one data.npz with a stratified validation split carved from the training set.


rule prepare:
    input:
        "resources/{dataset}/raw",
    output:
        "resources/{dataset}/data.npz",
    params:
        spec=to_json(SPEC.split),
    log:
        "logs/prepare/{dataset}.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles prepare --dataset {wildcards.dataset} --spec {params.spec:q} --raw {input} "
        "--out {output} 2> {log}"
