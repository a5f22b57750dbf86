# Stage 6: figures and summary, drawn from files only: changing a report setting reruns
# these jobs and nothing upstream.


rule plot_training_curves:
    input:
        member_files("history.csv"),
    output:
        png=report(
            "results/report/{experiment}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"experiment": "{experiment}", "figure": "training curves"},
        ),
        svg="results/report/{experiment}/training_curves.svg",
    params:
        dpi=SPEC.report.dpi,
    log:
        "logs/report/{experiment}_training_curves.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report curves --experiment {wildcards.experiment} --histories {input} "
        "--dpi {params.dpi} --out {output.png} {output.svg} 2> {log}"


rule plot_ensemble_curve:
    input:
        "results/{experiment}/ensemble.json",
    output:
        png=report(
            "results/report/{experiment}/ensemble_curve.png",
            caption="../report/ensemble_curve.rst",
            category="Ensembles",
            labels={"experiment": "{experiment}", "figure": "accuracy vs ensemble size"},
        ),
        svg="results/report/{experiment}/ensemble_curve.svg",
    params:
        dpi=SPEC.report.dpi,
        published=lambda wc: published(wc.experiment),
    log:
        "logs/report/{experiment}_ensemble_curve.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report ensemble --experiment {wildcards.experiment} --summary {input} "
        "--published {params.published:q} --dpi {params.dpi} --out {output.png} {output.svg} 2> {log}"


rule plot_reliability:
    input:
        json="results/{experiment}/ensemble.json",
        data=DATA,
        probs=member_files("probs_{split}.npy", "test"),
    output:
        png=report(
            "results/report/{experiment}/reliability.png",
            caption="../report/reliability.rst",
            category="Calibration",
            labels={"experiment": "{experiment}", "figure": "reliability diagrams"},
        ),
        svg="results/report/{experiment}/reliability.svg",
    params:
        dpi=SPEC.report.dpi,
        ece_bins=SPEC.ensemble.ece_bins,
    log:
        "logs/report/{experiment}_reliability.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report reliability --experiment {wildcards.experiment} "
        "--summary {input.json} --data {input.data} --test {input.probs} --ece-bins {params.ece_bins} "
        "--dpi {params.dpi} --out {output.png} {output.svg} 2> {log}"


rule plot_accuracy:
    input:
        list(ensemble_jsons().values()),
    output:
        png=report(
            "results/report/accuracy.png",
            caption="../report/accuracy.rst",
            category="Summary",
            labels={"figure": "accuracy per experiment"},
        ),
        svg="results/report/accuracy.svg",
    params:
        dpi=SPEC.report.dpi,
        experiments=json.dumps(ensemble_jsons()),
    log:
        "logs/report/accuracy.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report accuracy --experiments {params.experiments:q} --dpi {params.dpi} "
        "--out {output.png} {output.svg} 2> {log}"


rule plot_cost:
    input:
        flat(run_files()),
    output:
        png=report(
            "results/report/cost.png",
            caption="../report/cost.rst",
            category="Cost",
            labels={"figure": "cost per model"},
        ),
        svg="results/report/cost.svg",
    params:
        dpi=SPEC.report.dpi,
        runs=json.dumps(run_files()),
    log:
        "logs/report/cost.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report cost --runs {params.runs:q} --dpi {params.dpi} "
        "--out {output.png} {output.svg} 2> {log}"


rule plot_shift:
    input:
        list(shift_jsons().values()),
    output:
        png=report(
            "results/report/shift.png",
            caption="../report/shift.rst",
            category="Distribution shift",
            labels={"figure": "accuracy and ECE under shift"},
        ),
        svg="results/report/shift.svg",
    params:
        dpi=SPEC.report.dpi,
        summaries=json.dumps(shift_jsons()),
    log:
        "logs/report/shift.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report shift --summaries {params.summaries:q} --dpi {params.dpi} "
        "--out {output.png} {output.svg} 2> {log}"


rule plot_diversity:
    input:
        diversity="results/{experiment}/diversity.json",
        ensemble="results/{experiment}/ensemble.json",
    output:
        png=report(
            "results/report/{experiment}/diversity.png",
            caption="../report/diversity.rst",
            category="Ensembles",
            labels={"experiment": "{experiment}", "figure": "member diversity"},
        ),
        svg="results/report/{experiment}/diversity.svg",
    params:
        dpi=SPEC.report.dpi,
    log:
        "logs/report/{experiment}_diversity.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report diversity --experiment {wildcards.experiment} --diversity {input.diversity} "
        "--summary {input.ensemble} --dpi {params.dpi} --out {output.png} {output.svg} 2> {log}"


rule plot_ood:
    input:
        list(ood_jsons().values()),
    output:
        png=report(
            "results/report/ood.png",
            caption="../report/ood.rst",
            category="Out-of-distribution detection",
            labels={"figure": "OOD detection: ROC and AUROC against ensemble size"},
        ),
        svg="results/report/ood.svg",
    params:
        dpi=SPEC.report.dpi,
        summaries=json.dumps(ood_jsons()),
    log:
        "logs/report/ood.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report ood --summaries {params.summaries:q} --dpi {params.dpi} "
        "--out {output.png} {output.svg} 2> {log}"


rule plot_selective:
    input:
        "results/{experiment}/selective.json",
    output:
        png=report(
            "results/report/{experiment}/selective.png",
            caption="../report/selective.rst",
            category="Selective prediction",
            labels={"experiment": "{experiment}", "figure": "risk-coverage curves"},
        ),
        svg="results/report/{experiment}/selective.svg",
    params:
        dpi=SPEC.report.dpi,
    log:
        "logs/report/{experiment}_selective.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report selective --experiment {wildcards.experiment} --selective {input} "
        "--dpi {params.dpi} --out {output.png} {output.svg} 2> {log}"


rule plot_frontier:
    input:
        "results/frontier.json",
    output:
        png=report(
            "results/report/frontier.png",
            caption="../report/frontier.rst",
            category="Cost",
            labels={"figure": "accuracy, NLL and ECE against training cost"},
        ),
        svg="results/report/frontier.svg",
    params:
        dpi=SPEC.report.dpi,
    log:
        "logs/report/frontier.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report frontier --frontier {input} --dpi {params.dpi} "
        "--out {output.png} {output.svg} 2> {log}"


rule summary:
    input:
        ensembles=list(ensemble_jsons().values()),
        runs=flat(run_files()),
        comparisons="results/comparisons.json",
        shift=list(shift_jsons().values()),
        diversity=list(diversity_jsons().values()),
        ood=list(ood_jsons().values()),
        selective=list(selective_jsons().values()),
        frontier="results/frontier.json",
        methods=list(methods_jsons().values()),
    output:
        md=report(SUMMARY, caption="../report/summary.rst", category="Summary",
                  labels={"figure": "summary table"}),
        csv="results/report/summary.csv",
    params:
        experiments=json.dumps(ensemble_jsons()),
        runs=json.dumps(run_files()),
        published=published(),
        shift=json.dumps(shift_jsons()),
        diversity=json.dumps(diversity_jsons()),
        ood=json.dumps(ood_jsons()),
        selective=json.dumps(selective_jsons()),
        methods=json.dumps(methods_jsons()),
    log:
        "logs/report/summary.log",
    localrule: True
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report summary --experiments {params.experiments:q} --runs {params.runs:q} "
        "--comparisons {input.comparisons} --published {params.published:q} --shift {params.shift:q} "
        "--diversity {params.diversity:q} --ood {params.ood:q} --selective {params.selective:q} "
        "--frontier {input.frontier} --methods {params.methods:q} "
        "--out {output.md} {output.csv} 2> {log}"
