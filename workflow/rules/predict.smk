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


# An extra member of a run (docs/study.md 5.11): its final model with test-time augmentation
# (`tta`), a kept snapshot (`epochN`) or its SWA average (`swa`), on val and test: one job and
# its own files per member. TTA's settings are params of the TTA jobs only. (The corrupted and
# OOD sets: one job per experiment and set for all its extra members, in shift.smk and ood.smk.)
rule predict_member:
    wildcard_constraints:
        member=r"tta|swa|epoch\d+",
    input:
        weights=lambda wc: member_weights(wc.experiment, int(wc.seed), wc.member),
        data=DATA,
    output:
        val="results/{experiment}/seed{seed}/{member}/probs_val.npy",
        test="results/{experiment}/seed{seed}/{member}/probs_test.npy",
        metrics="results/{experiment}/seed{seed}/{member}/metrics.json",
    params:
        tta=lambda wc: tta_params([wc.member]),
    log:
        "logs/predict/{experiment}/seed{seed}_{member}.log",
    threads: 1  # short jobs, mostly start-up: two at once on a 2-core machine
    resources:
        gpu=1,
        gpu_slots=1,
        predict_settings=lambda wc: predict_settings(wc.experiment),
        tta_spec=tta_spec(),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict-member --weights {input.weights} --member {wildcards.member} "
        "--tta {resources.tta_spec:q} "
        "--data {input.data} --val {output.val} --test {output.test} --metrics {output.metrics} "
        "--spec {resources.predict_settings:q} --threads {threads} 2> {log}"
