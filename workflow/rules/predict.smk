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
# (`tta`), a kept snapshot (`epochN`) or its SWA average (`swa`), on every set in one job: val,
# test, each corrupted set and each OOD set. Each member is its own job and files: adding one
# predicts only it; TTA's settings are params of the TTA jobs only. (A new corrupted or OOD set
# repredicts every extra member: one model load each, instead of a job per member and set.)
MEMBER_DIR = "results/{experiment}/seed{seed}/{member}"


rule predict_member:
    wildcard_constraints:
        member=r"tta|swa|epoch\d+",
    input:
        weights=lambda wc: member_spec(wc.experiment, wc.seed, wc.member)["weights"],
        data=DATA,
        shift=list(shift_sets().values()),
        ood=list(ood_sets().values()),
    output:
        val=f"{MEMBER_DIR}/probs_val.npy",
        test=f"{MEMBER_DIR}/probs_test.npy",
        metrics=f"{MEMBER_DIR}/metrics.json",
        shift=[f"{MEMBER_DIR}/shift/{c}.npy" for c in CORRUPTIONS],
        ood=[f"{MEMBER_DIR}/ood/{s}.npy" for s in OOD_SETS],
    params:
        tta=lambda wc: tta_params([wc.member]),
        member=lambda wc: "" if wc.member == "tta" else f"--member {wc.member}",
        tta_option=lambda wc: tta_option([wc.member]),
        shift=lambda wc: json.dumps({c: [shift_set_file(c), member_file(wc, f"shift/{c}")] for c in CORRUPTIONS}),
        ood=lambda wc: json.dumps({s: [ood_set_file(s), member_file(wc, f"ood/{s}")] for s in OOD_SETS}),
    log:
        "logs/predict/{experiment}/seed{seed}_{member}.log",
    threads: 1  # short jobs, mostly start-up: two at once on a 2-core machine
    resources:
        gpu=1,
        gpu_slots=1,
        predict_settings=lambda wc: predict_settings(wc.experiment),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict-member --weights {input.weights} {params.member} {params.tta_option} "
        "--data {input.data} --val {output.val} --test {output.test} --metrics {output.metrics} "
        "--shift {params.shift:q} --ood {params.ood:q} --spec {resources.predict_settings:q} "
        "--threads {threads} 2> {log}"
