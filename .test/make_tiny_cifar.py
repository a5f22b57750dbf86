"""Write .test/data/cifar-10-python.tar.gz (upstream layout, 200 + 60 synthetic images) and
.test/data/source.yaml naming it with its MD5, for .test/cifar10-tiny.yaml."""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from cifar_fixture import make_cifar10_archive  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data"
    archive = out / "cifar-10-python.tar.gz"
    md5 = make_cifar10_archive(archive, per_batch=40, test_size=60)
    (out / "source.yaml").write_text(yaml.safe_dump({"data": {"source": str(archive), "md5": md5}}))
    print(f"{archive} (MD5 {md5}); config: {out / 'source.yaml'}")


if __name__ == "__main__":
    main()
