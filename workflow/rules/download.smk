# Stage 1: fetch the dataset (torchvision's download with its MD5 check, or a local
# archive/folder for offline machines) and, when asked for, ImageNet weights.


rule download:
    output:
        directory("resources/{dataset}/raw"),
    params:
        spec=to_json(SPEC.source),
    log:
        "logs/download/{dataset}.log",
    retries: 2
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles download --dataset {wildcards.dataset} --spec {params.spec:q} --out {output} 2> {log}"


rule download_weights:
    output:
        WEIGHTS,
    params:
        spec=to_json(SPEC.pretrained_weights),
    log:
        "logs/download/weights.log",
    retries: 2
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles download-weights --spec {params.spec:q} --out {output} 2> {log}"
