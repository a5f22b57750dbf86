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
        dpi=config["report"]["dpi"],
    log:
        "logs/report/{experiment}_training_curves.log",
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report curves --experiment {wildcards.experiment} --inputs {input} "
        "--dpi {params.dpi} --out {output.png} {output.svg} 2> {log}"


rule plot_ensemble_curve:
    input:
        csv="results/{experiment}/ensemble.csv",
        json="results/{experiment}/ensemble.json",
    output:
        png=report(
            "results/report/{experiment}/ensemble_curve.png",
            caption="../report/ensemble_curve.rst",
            category="Ensembles",
            labels={"experiment": "{experiment}", "figure": "accuracy vs ensemble size"},
        ),
        svg="results/report/{experiment}/ensemble_curve.svg",
    params:
        dpi=config["report"]["dpi"],
        published=lambda wc: json.dumps(
            (config["report"].get("published") or {}).get(wc.experiment) or {}
        ),
    log:
        "logs/report/{experiment}_ensemble_curve.log",
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report ensemble --experiment {wildcards.experiment} "
        "--inputs {input.csv} {input.json} --published {params.published:q} --dpi {params.dpi} "
        "--out {output.png} {output.svg} 2> {log}"


rule summary:
    input:
        metrics=lambda wc: [
            path
            for e in summary_inputs(wc).values()
            for m in e["metrics"].values()
            for path in m.values()
        ],
        ensembles=expand("results/{experiment}/ensemble.json", experiment=EXPERIMENTS),
    output:
        md=report(SUMMARY, caption="../report/summary.rst", category="Summary"),
        csv="results/report/summary.csv",
    params:
        experiments=lambda wc: json.dumps(summary_inputs(wc)),
        published=json.dumps(config["report"].get("published") or {}),
    log:
        "logs/report/summary.log",
    conda:
        "../../envs/torch.yaml"
    shell:
        "cifar-ensembles report summary --experiments {params.experiments:q} "
        "--published {params.published:q} --out {output.md} {output.csv} 2> {log}"
