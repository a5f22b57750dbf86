# Stage 9: what each way of spending compute buys (docs/study.md 5.11). Per experiment, every
# method its members allow (single, single + TTA, SWA, snapshot ensemble, and each pooled over
# the first k seeds) scored alike on test, the corrupted sets and the OOD sets -> methods.json;
# then every experiment's methods with their training and prediction cost and the Pareto
# fronts -> frontier.json. Nothing here predicts: it reads what the predict jobs wrote.


def methods_inputs(wildcards):
    e = wildcards.experiment
    return {
        "data": DATA,
        "val": [f"{run_dir(e, s)}/probs_val.npy" for s in seeds(e)],
        "test": [f"{run_dir(e, s)}/probs_test.npy" for s in seeds(e)],
        "extra_val": extra_probs(e, "probs_val"),
        "extra_test": extra_probs(e, "probs_test"),
        "shift": [f for c in CORRUPTIONS for f in shift_files(e, c)],
        "sets": list(shift_sets().values()),
        "ood": [f for s in OOD_SETS for f in ood_files(e, s)],
    }


def shift_files(experiment, corruption):
    """The final models' probabilities on a corrupted set (one file), then each extra member's."""
    return [f"results/{experiment}/shift/{corruption}.npy", *extra_probs(experiment, f"shift/{corruption}")]


def ood_files(experiment, name):
    return [f"results/{experiment}/ood/{name}.npy", *extra_probs(experiment, f"ood/{name}")]


rule methods:
    input:
        unpack(methods_inputs),
    output:
        "results/{experiment}/methods.json",
    params:
        seeds=lambda wc: " ".join(str(s) for s in seeds(wc.experiment)),
        extras=lambda wc: json.dumps(extra_members(wc.experiment)),
        shift=lambda wc: json.dumps({c: shift_files(wc.experiment, c) for c in CORRUPTIONS}),
        sets=json.dumps(shift_sets()),
        ood=lambda wc: json.dumps({s: ood_files(wc.experiment, s) for s in OOD_SETS}),
        tta_views=SPEC.tta.view_count,
        spec=to_json(SPEC.ensemble),
    log:
        "logs/frontier/{experiment}_methods.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles methods --experiment {wildcards.experiment} --data {input.data} "
        "--seeds {params.seeds} --val {input.val} --test {input.test} --extras {params.extras:q} "
        "--extra-val {input.extra_val} --extra-test {input.extra_test} --shift {params.shift:q} "
        "--sets {params.sets:q} --ood {params.ood:q} --tta-views {params.tta_views} "
        "--spec {params.spec:q} --out {output} 2> {log}"


rule frontier:
    input:
        data=DATA,
        methods=list(methods_jsons().values()),
        runs=flat(run_files()),
    output:
        "results/frontier.json",
    params:
        methods=json.dumps(methods_jsons()),
        runs=json.dumps(run_files()),
        costs=run_costs(),
    log:
        "logs/frontier/frontier.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles frontier --methods {params.methods:q} --runs {params.runs:q} "
        "--costs {params.costs:q} --data {input.data} --out {output} 2> {log}"
