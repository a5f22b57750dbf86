# Stage 4: class probabilities of every model on the validation and the test split.


rule predict:
    input:
        model="results/{experiment}/seed{seed}/model.pt",
        data=DATA,
    output:
        probs="results/{experiment}/seed{seed}/probs_{split}.npy",
        metrics="results/{experiment}/seed{seed}/metrics_{split}.json",
    params:
        batch_size=config["predict"]["batch_size"],
        device=config["predict"]["device"],
    log:
        "logs/predict/{experiment}/seed{seed}_{split}.log",
    threads: 2
    resources:
        gpu=1,
        gpu_slots=8,  # a whole GPU, as its GPU claim (cifar_ensembles.gpu) takes
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict --model {input.model} --data {input.data} --split {wildcards.split} "
        "--probs {output.probs} --metrics {output.metrics} --batch-size {params.batch_size} "
        "--device {params.device} --threads {threads} 2> {log}"
