# Stage 8: out-of-distribution detection and selective prediction. Each OOD set of
# `ood.run_sets` is prepared once (one job per set, at the test split's shape), each
# experiment's members predict it (one job per experiment and set: a new set predicts only
# itself, retraining one experiment repredicts only its own), then per experiment ood.json
# scores it against the test split. selective.json reads the test and shift predictions
# that earlier stages wrote: it predicts nothing.


rule ood_set:
    input:
        DATA,
    output:
        "resources/{dataset}/ood/{oodset}.npz",
    params:
        spec=lambda wc: to_json(SPEC.ood_set(wc.oodset)),
    log:
        "logs/ood/{dataset}_{oodset}.log",
    threads: 1
    retries: 2  # a download may fail for a moment
    localrule: True  # downloads (svhn, cifar100) need the network of the submitting machine
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles ood-set --name {wildcards.oodset} --spec {params.spec:q} --data {input} "
        "--out {output} 2> {log}"


rule predict_ood:
    input:
        models=lambda wc: models_of(wc.experiment),
        set=ood_set_file("{oodset}"),
    output:
        "results/{experiment}/ood/{oodset}.npy",
    log:
        "logs/ood/{experiment}/predict_{oodset}.log",
    threads: 1
    resources:
        gpu=1,
        gpu_slots=1,  # one of a GPU's 8 slots, as predict
        predict_settings=lambda wc: predict_settings(wc.experiment),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict-ood --set {input.set} --models {input.models} --out {output} "
        "--spec {resources.predict_settings:q} --threads {threads} 2> {log}"


rule ood_summary:
    input:
        data=DATA,
        summary="results/{experiment}/ensemble.json",
        test=member_files("probs_{split}.npy", "test"),
        ood=lambda wc: list(ood_probs(wc.experiment).values()),
        sets=list(ood_sets().values()),
    output:
        "results/{experiment}/ood.json",
    params:
        spec=to_json(SPEC.ensemble),
        ood=lambda wc: json.dumps(ood_probs(wc.experiment)),
        sets=json.dumps(ood_sets()),
        kinds=json.dumps(ood_kinds()),
    log:
        "logs/ood/{experiment}_summary.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles ood --experiment {wildcards.experiment} --summary {input.summary} "
        "--test {input.test} --ood {params.ood:q} --sets {params.sets:q} --kinds {params.kinds:q} "
        "--data {input.data} --spec {params.spec:q} --out {output} 2> {log}"


rule selective:
    input:
        data=DATA,
        summary="results/{experiment}/ensemble.json",
        test=member_files("probs_{split}.npy", "test"),
        shift=lambda wc: list(shift_probs(wc.experiment).values()),
        sets=list(shift_sets().values()),
    output:
        "results/{experiment}/selective.json",
    params:
        spec=to_json(SPEC.selective),
        shift=lambda wc: json.dumps(shift_probs(wc.experiment)),
        sets=json.dumps(shift_sets()),
    log:
        "logs/ood/{experiment}_selective.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles selective --experiment {wildcards.experiment} --summary {input.summary} "
        "--test {input.test} --data {input.data} --shift {params.shift:q} --sets {params.sets:q} "
        "--spec {params.spec:q} --out {output} 2> {log}"


# The experiment's extra members (TTA, snapshots, SWA; docs/study.md 5.11) on one OOD set, in
# the row order of extra_members: a job of their own, so that a TTA setting repredicts only
# these and the final models' probabilities stay as they are. Only experiments with extra
# members ask for it.
rule predict_ood_members:
    input:
        weights=lambda wc: extra_weights(wc.experiment),
        set=ood_set_file("{oodset}"),
    output:
        "results/{experiment}/ood/{oodset}.members.npy",
    params:
        members=lambda wc: json.dumps(extra_specs(wc.experiment)),
        tta=lambda wc: tta_params(member_names(wc.experiment)),
    log:
        "logs/ood/{experiment}/predict_{oodset}_members.log",
    threads: 1
    resources:
        gpu=1,
        gpu_slots=1,  # one of a GPU's 8 slots, as predict
        predict_settings=lambda wc: predict_settings(wc.experiment),
        tta_spec=tta_spec(),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict-ood --set {input.set} --members {params.members:q} --tta {resources.tta_spec:q} "
        "--out {output} --spec {resources.predict_settings:q} --threads {threads} 2> {log}"
