"""Eigenspace exaggeration in linear regression under gradient flow (Nagarajan et al. 2023, closed form).

Linear regression, gradient flow from zero on the squared loss. With the training inputs' SVD ``X = U S V^T`` and
``lam_k = s_k^2 / n`` (eigenvalues of the empirical covariance), the teacher trained for time ``T`` and a student
trained for time ``t`` on the teacher's predictions at the training inputs are, in closed form::

    w_teacher(T)   = V diag((1 - exp(-lam_k T)) / s_k) U^T y
    w_student(t,T) = V diag((1 - exp(-lam_k t)) (1 - exp(-lam_k T)) / s_k) U^T y

so along eigendirection ``k`` the student keeps a fraction ``1 - exp(-lam_k t)`` of the teacher's progress: it
*exaggerates* the teacher's bias toward the top eigendirections (the regulariser view of distillation). Against an
over-trained teacher (large ``T``) that has fitted the noise in the small-eigenvalue directions, this helps; against
an under-trained one it hurts. The student uses the teacher's schedule (``t = T``).

Setting: features with a geometric spectrum ``10 .. 0.01`` (``--dim`` directions), signal in the top ``--signal``
directions, label noise ``--noise``, ``--n-train`` points (100, 200 = d and 400); test MSE on fresh noisy points, mean and std over seeds.
Writes ``benchmarks/results/distillation_linear.md`` and ``.png`` (per-direction progress and test MSE vs ``T``).

    python benchmarks/distillation_linear.py          # full run (seconds)
    python benchmarks/distillation_linear.py --quick  # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TIMES = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)


def make_problem(seed: int, dim: int, signal: int, n_train: int, n_test: int, noise: float):
    rng = np.random.default_rng(seed)
    spectrum = np.geomspace(10.0, 0.01, dim)
    beta = np.zeros(dim)
    beta[:signal] = rng.normal(size=signal) / np.sqrt(spectrum[:signal] * signal)  # each direction adds equal variance
    def draw(n):
        x = rng.normal(size=(n, dim)) * np.sqrt(spectrum)
        return x, x @ beta + noise * rng.normal(size=n)
    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test, spectrum


def flow_weights(x: np.ndarray, y: np.ndarray, teacher_time: float, student_time: float | None = None) -> np.ndarray:
    """Closed-form gradient-flow weights of the teacher (``student_time=None``) or of the student distilled from it."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > 1e-10 * s.max()
    u, s, vt = u[:, keep], s[keep], vt[keep]
    lam = s**2 / len(x)
    gain = 1.0 - np.exp(-lam * teacher_time)
    if student_time is not None:
        gain = gain * (1.0 - np.exp(-lam * student_time))
    return vt.T @ (gain / s * (u.T @ y))


def run(seeds: int, dim: int, signal: int, n_train: int, n_test: int, noise: float, times=TIMES) -> list[dict]:
    rows = []
    for T in times:
        teacher, student = [], []
        for seed in range(seeds):
            x, y, x_test, y_test, _ = make_problem(seed, dim, signal, n_train, n_test, noise)
            teacher.append(np.mean((x_test @ flow_weights(x, y, T) - y_test) ** 2))
            student.append(np.mean((x_test @ flow_weights(x, y, T, T) - y_test) ** 2))
        rows.append({"n": n_train, "T": T, "teacher": np.array(teacher), "student": np.array(student)})
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Linear regression, gradient flow in closed form; spectrum 10..0.01 over d = {args.dim} directions, signal "
        f"in the top {args.signal}, label noise {args.noise}; test MSE on fresh noisy points (noise floor "
        f"{args.noise ** 2:.2f}), mean +- std over {args.seeds} seeds. The student is trained for t = T on the "
        "teacher's training-set predictions. n = number of training points (n = d is the worst-conditioned case).",
        "",
        "| n | teacher time T | teacher test MSE | self-distilled student test MSE | student better in |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        wins = int((r["student"] < r["teacher"]).sum())
        lines.append(
            f"| {r['n']} | {r['T']:g} | {r['teacher'].mean():.3f} +- {r['teacher'].std():.3f} | "
            f"{r['student'].mean():.3f} +- {r['student'].std():.3f} | {wins}/{len(r['teacher'])} seeds |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lam = np.geomspace(10.0, 0.01, 200)
    for T, color in ((3.0, "tab:blue"), (100.0, "tab:red")):
        teacher = 1 - np.exp(-lam * T)
        left.plot(lam, teacher, color=color, label=f"teacher, T={T:g}")
        left.plot(lam, teacher * (1 - np.exp(-lam * T)), "--", color=color, label=f"student, t=T={T:g}")
    left.set_xscale("log")
    left.set_xlabel("eigenvalue lambda_k")
    left.set_ylabel("fraction of the OLS fit learned along direction k")
    left.set_title("Distillation shrinks small-eigenvalue directions further")
    left.legend(fontsize=8)
    for n, style in zip(sorted({r["n"] for r in rows}), ("-", "--", ":")):
        sub = [r for r in rows if r["n"] == n]
        T = np.array([r["T"] for r in sub])
        for key, color in (("teacher", "tab:gray"), ("student", "tab:green")):
            mean = np.array([r[key].mean() for r in sub])
            std = np.array([r[key].std() for r in sub])
            right.errorbar(T, mean, yerr=std, color=color, ls=style, marker="o", ms=3, capsize=2, label=f"{key}, n={n}")
    right.axhline(args.noise**2, color="k", lw=0.8, ls=":", label="noise floor")
    right.set_xscale("log")
    right.set_xlabel("teacher training time T (student: t = T)")
    right.set_ylabel("test MSE")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--signal", type=int, default=20)
    parser.add_argument("--n-train", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="3 seeds, small problem; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "distillation_linear.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.dim, args.n_train, args.n_test = 3, 50, [100], 200
    rows = [row for n in args.n_train for row in run(args.seeds, args.dim, args.signal, n, args.n_test, args.noise)]
    text = table(rows, args)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/distillation_linear.py"
        args.out.write_text(text + f"\nCommand: `{command}`\n\n![progress per eigendirection and test MSE]({args.out.with_suffix('.png').name})\n")
        plot(rows, args, args.out.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()
