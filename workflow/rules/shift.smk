# Stage 7: distribution shift. Corrupted copies of the test split (one job per corruption),
# each experiment's members on each (one job per experiment and corruption: retraining one
# experiment repredicts only its own), then per experiment the scores under shift and the
# diversity of its members. Adding or removing a corruption runs only its own jobs and the
# analyses and figures after them; nothing retrains.


rule shift_set:
    input:
        DATA,
    output:
        "resources/{dataset}/shift/{corruption}.npz",
    params:
        spec=lambda wc: to_json(SPEC.shift_set(wc.corruption)),
    log:
        "logs/shift/{dataset}_{corruption}.log",
    threads: 1
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles shift-set --dataset {wildcards.dataset} --corruption {wildcards.corruption} "
        "--spec {params.spec:q} --data {input} --out {output} 2> {log}"


rule predict_shift:
    input:
        models=lambda wc: models_of(wc.experiment),
        set=shift_set_file("{corruption}"),
    output:
        "results/{experiment}/shift/{corruption}.npy",
    log:
        "logs/shift/{experiment}/predict_{corruption}.log",
    threads: 1
    resources:
        gpu=1,
        gpu_slots=1,  # one of a GPU's 8 slots, as predict
        predict_settings=lambda wc: predict_settings(wc.experiment),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict-shift --set {input.set} --models {input.models} --out {output} "
        "--spec {resources.predict_settings:q} --threads {threads} 2> {log}"


rule shift_summary:
    input:
        unpack(shift_summary_inputs),
    output:
        "results/{experiment}/shift.json",
    params:
        spec=to_json(SPEC.ensemble),
        shift=lambda wc: json.dumps(shift_probs(wc.experiment)),
        sets=json.dumps(shift_sets()),
        baseline=lambda wc: json.dumps(baseline_files()),
    log:
        "logs/shift/{experiment}_summary.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles shift --experiment {wildcards.experiment} --summary {input.summary} "
        "--test {input.test} --shift {params.shift:q} --sets {params.sets:q} --data {input.data} "
        "--spec {params.spec:q} --baseline {params.baseline:q} --out {output} 2> {log}"


rule diversity:
    input:
        data=DATA,
        test=member_files("probs_{split}.npy", "test"),
        shift=lambda wc: list(shift_probs(wc.experiment).values()),
        sets=list(shift_sets().values()),
    output:
        "results/{experiment}/diversity.json",
    params:
        seeds=lambda wc: " ".join(str(s) for s in seeds(wc.experiment)),
        shift=lambda wc: json.dumps(shift_probs(wc.experiment)),
        sets=json.dumps(shift_sets()),
    log:
        "logs/shift/{experiment}_diversity.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles diversity --seeds {params.seeds} --test {input.test} --data {input.data} "
        "--shift {params.shift:q} --sets {params.sets:q} --out {output} 2> {log}"


# The experiment's extra members (TTA, snapshots, SWA; docs/study.md 5.11) on one corrupted set, in
# the row order of extra_members: a job of their own, so that a TTA setting repredicts only
# these and the final models' probabilities stay as they are. Only experiments with extra
# members ask for it.
rule predict_shift_members:
    input:
        weights=lambda wc: extra_weights(wc.experiment),
        set=shift_set_file("{corruption}"),
    output:
        "results/{experiment}/shift/{corruption}.members.npy",
    params:
        members=lambda wc: json.dumps(extra_specs(wc.experiment)),
        tta=lambda wc: tta_params(member_names(wc.experiment)),
    log:
        "logs/shift/{experiment}/predict_{corruption}_members.log",
    threads: 1
    resources:
        gpu=1,
        gpu_slots=1,  # one of a GPU's 8 slots, as predict
        predict_settings=lambda wc: predict_settings(wc.experiment),
        tta_spec=tta_spec(),
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles predict-shift --set {input.set} --members {params.members:q} --tta {resources.tta_spec:q} "
        "--out {output} --spec {resources.predict_settings:q} --threads {threads} 2> {log}"
