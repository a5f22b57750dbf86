# Stage 4: class probabilities of every model on the validation and the test split.
# They depend on the model and the data only: how the job runs (device, batch size) comes
# from the experiment's runtime spec as a resource, so changing it repredicts nothing.


rule predict:
    input:
        model="results/{experiment}/seed{seed}/model.pt",
        data=DATA,
    output:
        probs="results/{experiment}/seed{seed}/probs_{split}.npy",
        metrics="results/{experiment}/seed{seed}/metrics_{split}.json",
    log:
        "logs/predict/{experiment}/seed{seed}_{split}.log",
    threads: 2
    resources:
        gpu=1,
        gpu_slots=1,  # one of a GPU's 8 slots: a prediction is short and leaves room for training
        predict_settings=lambda wc: predict_settings(wc.experiment),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict --model {input.model} --data {input.data} --split {wildcards.split} "
        "--probs {output.probs} --metrics {output.metrics} --spec {resources.predict_settings:q} "
        "--threads {threads} 2> {log}"
