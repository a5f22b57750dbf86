# Stage 1: fetch the dataset (torchvision's download with its MD5 check, or a local
# archive/folder for offline machines) and, when asked for, ImageNet weights.


rule download:
    output:
        directory("resources/{dataset}/raw"),
    params:
        source=optional_arg("--source", config["data"].get("source")),
        url=optional_arg("--url", config["data"].get("url")),
        md5=optional_arg("--md5", config["data"].get("md5")),
    log:
        "logs/download/{dataset}.log",
    retries: 2
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles download --dataset {wildcards.dataset} --out {output} "
        "{params.source} {params.url} {params.md5} 2> {log}"


rule download_weights:
    output:
        WEIGHTS,
    params:
        url=optional_arg("--url", config.get("pretrained_weights", {}).get("url")),
        file=optional_arg("--file", config.get("pretrained_weights", {}).get("file")),
    log:
        "logs/download/weights.log",
    retries: 2
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles download-weights --out {output} {params.url} {params.file} 2> {log}"
