# Stage 5: hard and soft voting for k = 1..N seeds; k chosen on validation.


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
    log:
        "logs/ensemble/{experiment}.log",
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles ensemble --data {input.data} --seeds {params.seeds} --val {input.val} "
        "--test {input.test} --method {params.method} --csv {output.csv} --json {output.json} 2> {log}"
