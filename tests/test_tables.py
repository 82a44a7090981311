"""Reading results back (issue 19, items 5 and 9): --table over what a glob gives it (not evaluated, not a run,
unreadable, evaluated under several settings) and --plot's learning curves from metrics.jsonl."""
import json
import os
import shutil

import pytest

import runs
from conftest import read_rows, refused, run_main, tiny_args, write_npz


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A finished 2-epoch TRADES + TRAIN run (M' and M), evaluated under three settings: eps 0.031 with PGD-2
    (monitored only), eps 0.05, then eps 0.05 with PGD-3: three rows in eval.json, two in "earlier"."""
    d = tmp_path_factory.mktemp("tables")
    npz = write_npz(d / "data.npz")
    run_main(tiny_args(npz, d / "runs" / "a", "--method", "trades", "--train"))
    ev = ["--eval", str(d / "runs" / "a" / "last.pt"), "--metrics", "nat", "--eval-steps", "2"]
    for extra in ([], ["--eps", "0.05"], ["--eps", "0.05", "--eval-steps", "3"]):
        run_main(ev + extra)
    return d / "runs"


def table(paths, capsys):
    """--table paths -> the printed lines (it must not exit)."""
    capsys.readouterr()
    run_main(["--table", *map(str, paths)])
    return capsys.readouterr().out.strip().splitlines()


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


# ------------------------------------------------------------------------------------- --table
def test_table_lists_a_folder_not_evaluated_and_still_prints(evaluated, tmp_path, capsys):
    """`--table runs/*` used to stop at the first folder without eval.json (exit 2, no table)."""
    todo = tmp_path / "b"
    shutil.copytree(evaluated / "a", todo, ignore=shutil.ignore_patterns("eval.json", "results.md"))
    lines = table([evaluated / "a", todo], capsys)
    assert lines[0].startswith("| run | eps | Natural |") and len(lines) == 2 + 3 + 1
    row = cells(lines[-1])
    assert row[0] == str(todo) and row[1].startswith("not evaluated") and f"--eval {todo}/best.pt" in row[1]
    assert len(row) == len(cells(lines[0]))  # a well-formed markdown row


@pytest.mark.parametrize("what", ["metrics.jsonl", "last.pt", "config.json", "missing", "study"])
def test_table_gives_a_row_to_what_is_not_a_run_and_one_line_when_nothing_is(what, evaluated, tmp_path, capsys):
    """A file argument used to end in a JSONDecodeError (metrics.jsonl) or UnicodeDecodeError (last.pt) traceback.
    Among runs (a glob's strays): a "not a run folder" row; alone: one line, exit 2."""
    study = tmp_path / "study"
    shutil.copytree(evaluated / "a", study / "a")  # a folder of run folders, as a study's root is
    path = {"missing": tmp_path / "nothing", "study": study}.get(what, evaluated / "a" / what)
    row = cells(table([evaluated / "a", path], capsys)[-1])
    assert row[0] == str(path) and row[1].startswith("not found" if what == "missing" else "not a run folder"), row
    if what == "study":
        assert f"--table {study}/*" in row[1]
    err = refused(["--table", str(path)], capsys)
    assert str(path) in err and ("not found" if what == "missing" else "not a run folder") in err


def test_table_says_an_unreadable_eval_json_in_its_row(evaluated, tmp_path, capsys):
    """It used to end in a JSONDecodeError traceback. The folder is a run all the same: its row, exit 0."""
    bad = tmp_path / "bad"
    shutil.copytree(evaluated / "a", bad)
    (bad / "eval.json").write_text('{"natural": 0.5, ')  # cut short
    for args in ([evaluated / "a", bad], [bad]):
        row = cells(table(args, capsys)[-1])
        assert row[0] == str(bad) and row[1].startswith("eval.json unreadable (JSONDecodeError"), row


def test_table_shows_every_row_of_a_run_evaluated_under_several_settings(evaluated, capsys):
    """It used to show the latest row only. Latest first (the row --table always showed), then the earlier ones;
    the run cell says which is which and the settings that tell them apart (the eps column says eps)."""
    lines = table([evaluated / "a"], capsys)
    rows = [cells(line) for line in lines[2:]]
    assert len(rows) == 3
    assert [r[1] for r in rows] == ["12.75/255", "12.75/255", f"{0.031 * 255:.2f}/255"]
    assert "latest" in rows[0][0] and "steps 3" in rows[0][0] and "n=32" in rows[0][0]
    assert all("earlier" in r[0] for r in rows[1:]) and all("steps 2" in r[0] for r in rows[1:])
    assert len({(r[0], r[1]) for r in rows}) == 3  # no two rows look alike
    md = (evaluated / "a" / "results.md").read_text().splitlines()  # results.md: the same rows, oldest first
    assert md == lines[2:][::-1]


def test_table_and_results_md_show_test_ltp_and_neighbour_agreement(evaluated, tmp_path, capsys):
    """The project's own metrics, test L_TP and nbr, were in eval.json but in no column. Now L_TP (3 decimals) and
    nbr@30 (natural / robust, %) in --table and results.md; the rows measured without them (old eval.json files too)
    say '-'."""
    run = tmp_path / "a"
    shutil.copytree(evaluated / "a", run)
    run_main(["--eval", str(run / "last.pt"), "--metrics", "tp,nbr", "--eps", "0.05", "--eval-steps", "3"])
    ev = json.loads((run / "eval.json").read_text())
    lines = table([run], capsys)
    head, rows = cells(lines[0]), [cells(line) for line in lines[2:]]
    assert head[-3:] == ["L_TP", "nbr@30", "checkpoint"] and all(len(r) == len(head) for r in rows)
    ltp, nbr = head.index("L_TP"), head.index("nbr@30")
    assert rows[0][ltp] == f"{ev['test_ltp']:.3f}"  # the latest row: measured into it (same settings)
    assert rows[0][nbr] == f"{100 * ev['nbr']['natural']['30']:.2f} / {100 * ev['nbr']['robust']['30']:.2f}"
    assert len(rows) == 3 and all(r[ltp] == r[nbr] == "-" for r in rows[1:])  # rows without them
    assert (run / "results.md").read_text().splitlines() == lines[2:][::-1]
    old = {k: v for k, v in ev.items() if k not in ("test_ltp", "nbr", "earlier")}  # an eval.json of older code
    old["nbr"] = {"natural": {"10": 0.25}, "robust": {"10": 0.125}}  # evaluated with --nbr-k 10 only
    (run / "eval.json").write_text(json.dumps(old))
    row = cells(table([run], capsys)[2])
    assert row[ltp] == "-" and row[nbr] == "25.00 / 12.50 (k=10)"
# ------------------------------------------------------------------------------------- --plot
def test_plot_of_one_run_writes_curves_png_in_its_folder(evaluated, tmp_path, capsys):
    shutil.copytree(evaluated / "a", tmp_path / "a")
    capsys.readouterr()
    path = run_main(["--plot", str(tmp_path / "a")])
    assert path == str(tmp_path / "a" / "curves.png") and path in capsys.readouterr().out
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_several_runs_writes_into_their_common_parent(evaluated, tmp_path, capsys):
    shutil.copytree(evaluated / "a", tmp_path / "runs" / "b")
    shutil.copytree(evaluated / "a", tmp_path / "runs" / "c")
    path = run_main(["--plot", str(tmp_path / "runs" / "b"), str(tmp_path / "runs" / "c")])
    assert path == str(tmp_path / "runs" / "curves_b_vs_c.png") and os.path.getsize(path) > 0


def test_curves_figure_draws_m_prime_solid_m_dashed_and_every_loss_term(evaluated):
    rows = read_rows(evaluated / "a")
    fig = runs.curves_figure({"a": [rows]})
    nat, pgd, loss = fig.axes[:3]  # a TRAIN run: the lambda / share panel after them (test_plot_draws_lambda...)
    style = {line.get_label(): line.get_linestyle() for line in nat.lines}
    assert style == {"a M'": "-", "a M": "--"}
    assert [list(line.get_ydata()) for line in pgd.lines] == [[100 * r[k] for r in rows]
                                                             for k in ("pgd2_acc", "std_pgd2_acc")]
    terms = sorted(k[5:] for k in rows[0] if k.startswith("loss/"))
    assert sorted(line.get_label() for line in loss.lines) == terms and "total" in terms


def figure_facts(fig):
    """What a reader of the PNG relies on, without pixels: (one figure legend holding every curve, no legend of an
    axis, the legend overlapping no panel, every axis labelled, integer epoch ticks only)."""
    fig.canvas.draw()  # lays the figure out
    renderer = fig.canvas.get_renderer()
    curves = {line.get_label() for ax in fig.axes for line in ax.lines if not line.get_label().startswith("_")}
    legend = fig.legends[0] if len(fig.legends) == 1 else None
    return (legend is not None and {t.get_text() for t in legend.get_texts()} == curves,
            all(ax.get_legend() is None for ax in fig.axes),
            legend is not None and not any(legend.get_window_extent(renderer).overlaps(ax.get_tightbbox(renderer))
                                           for ax in fig.axes),
            all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes),
            all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks()))


def test_curves_figure_has_one_legend_hiding_nothing_labelled_axes_and_integer_epochs(evaluated):
    """The M'/M legend was in one panel only, the loss legend covered a curve, the loss panel had no y label and
    epochs were ticked at 1.5, 2.5. A run without the gradient probe (constant lambda): three panels."""
    rows = [{k: v for k, v in r.items() if not k.startswith("grad/")} for r in read_rows(evaluated / "a")]
    for curves in ({"a": [rows]}, {"a": [rows], "b": [rows[:1]]}):
        fig = runs.curves_figure(curves)
        assert len(fig.axes) == 3 and figure_facts(fig) == (True,) * 5
        assert fig.axes[2].get_ylabel() == "loss (epoch mean)"


def test_plot_draws_lambda_and_the_gradient_share_when_the_run_logged_them(evaluated, tmp_path):
    """--lam share:S runs log lambda(t), share_target and grad/share per epoch: a fourth panel draws them (and the
    probe's share of a constant lambda); log scale when all are positive."""
    npz = write_npz(tmp_path / "data.npz")
    run_main(tiny_args(npz, tmp_path / "share", "--method", "trades", "--train", "--lam", "share:0.2"))
    rows = read_rows(tmp_path / "share")
    assert len({r["lambda"] for r in rows}) == 2 and all("grad/share" in r for r in rows)
    for curves in ({"share": [rows]}, {"share": [rows], "const": [read_rows(evaluated / "a")]}):
        fig = runs.curves_figure(curves)
        assert len(fig.axes) == 4 and figure_facts(fig) == (True,) * 5
        panel = fig.axes[3]
        assert panel.get_title() == "lambda(t) and gradient share" and panel.get_yscale() == "log"
        drawn = {line.get_label(): list(line.get_ydata()) for line in panel.lines}
        prefix = "" if len(curves) == 1 else "share "
        assert drawn[prefix + "lambda(t)"] == [r["lambda"] for r in rows]
        assert drawn[prefix + "grad/share"] == [r["grad/share"] for r in rows]
    assert os.path.getsize(run_main(["--plot", str(tmp_path / "share")])) > 0


def test_curves_of_a_study_are_the_mean_over_seeds(evaluated, tmp_path):
    """The evidence study draws its curves with the same function: one line per label, the mean of its seeds."""
    seeds = [[{**r, "nat_acc": acc} for r in read_rows(evaluated / "a")] for acc in (0.2, 0.4)]
    fig = runs.curves_figure({"TRADES": seeds, "AT": seeds[:1]})
    assert [list(line.get_ydata()) for line in fig.axes[0].lines[::2]] == [pytest.approx([30, 30]), [20, 20]]
    path = runs.plot_learning_curves({"TRADES": seeds}, str(tmp_path / "study.png"))
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize("case, needle", [("empty folder", "has no metrics.jsonl"), ("missing", "has no metrics.jsonl"),
                                          ("file", "has no metrics.jsonl"), ("no epoch", "no epoch"),
                                          ("garbage", "metrics.jsonl line 2")])
def test_plot_refuses_what_it_cannot_draw_in_one_line(case, needle, evaluated, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(evaluated / "a", run)
    path = {"empty folder": tmp_path / "empty", "missing": tmp_path / "nothing", "file": run / "last.pt"}.get(case, run)
    os.makedirs(tmp_path / "empty")
    if case == "no epoch":
        (run / "metrics.jsonl").write_text("")
    if case == "garbage":
        (run / "metrics.jsonl").write_text(json.dumps(read_rows(evaluated / "a")[0]) + "\nnot json\n")
    err = refused(["--plot", str(run), str(path)] if case != "garbage" else ["--plot", str(run)], capsys)
    assert needle in err and str(path) in err
    assert not os.path.exists(tmp_path / "curves_run_vs_empty.png")


def test_plot_skips_a_row_being_written(evaluated, tmp_path):
    """A run still training may be caught half-way through a metrics.jsonl line: the last complete epoch counts."""
    run = tmp_path / "run"
    shutil.copytree(evaluated / "a", run)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "lr"')
    assert [r["epoch"] for r in runs.read_metrics(run)] == [1, 2]
    assert os.path.isfile(run_main(["--plot", str(run)]))


def test_plot_that_cannot_write_its_picture_says_so_in_one_line(evaluated, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(evaluated / "a", run)
    os.makedirs(run / "curves.png")  # where the picture goes: a folder in the way
    assert "could not write" in refused(["--plot", str(run)], capsys)
    assert set(os.listdir(run)) == {*os.listdir(evaluated / "a"), "curves.png"}  # no temporary file left


def test_plot_of_many_runs_names_its_picture_by_the_first_run_and_a_hash_of_all():
    many = [f"runs/a_long_run_name_{i:03d}" for i in range(8)]
    path = runs.plot_path(many)
    assert os.path.dirname(path) == os.path.abspath("runs") and len(os.path.basename(path)) < 160
    assert os.path.basename(path).startswith("curves_a_long_run_name_000_and_7_more_")
    assert path != runs.plot_path(many[:-1] + ["runs/another"])
