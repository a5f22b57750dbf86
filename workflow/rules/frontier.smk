# Stage 9: what each way of spending compute buys (docs/study.md 5.11). Per experiment, every
# method its members allow (single, single + TTA, SWA, snapshot ensemble, and each pooled over
# the first k seeds) scored alike on test, the corrupted sets and the OOD sets -> methods.json;
# then every experiment's methods with their training and prediction cost and the Pareto
# fronts -> frontier.json. Nothing here predicts: it reads what the predict jobs wrote.


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
        # the views of this experiment's TTA members (1 without: another's TTA reruns nothing here)
        tta_views=lambda wc: SPEC.tta.view_count if SPEC.tta.applies_to(wc.experiment) else 1,
        spec=to_json(SPEC.ensemble.scoring),
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
