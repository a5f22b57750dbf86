# cifar-ensembles: reproduce and extend a CIFAR-10 ResNet-18 study (SAM/ASAM, ASL, EMA,
# seed ensembles). The README explains the stages; config.yaml documents every setting.

# The documented defaults live beside this file; --configfile files are merged over them.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "workflow/rules/common.smk"


wildcard_constraints:
    dataset=DATASET,
    experiment="|".join(EXPERIMENTS),
    seed=r"\d+",
    split="val|test",
    corruption=r"[a-z][a-z0-9_]*",
    oodset=r"[a-z][a-z0-9_]*",


include: "workflow/rules/download.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/shift.smk"
include: "workflow/rules/ood.smk"
include: "workflow/rules/frontier.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        all_outputs(),
    default_target: True


onsuccess:
    print(f"\nReport: {os.path.abspath(SUMMARY)}  (figures in {os.path.dirname(os.path.abspath(SUMMARY))}/)")
