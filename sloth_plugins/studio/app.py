"""The studio's Gradio UI. Gradio, because it is the web UI Hugging Face users already know
(Spaces, model demos), it serves from one Python process with no build step, and it has the
file upload, tables, plots and polling timer this app needs.

Bound to 127.0.0.1 by default; another address needs ``--auth user:pass``. Uploads land in
``<runs dir>/.uploads`` (Gradio's temp dir is pointed there), and a run copies its dataset into
its own folder: uploaded files never leave the runs folder.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from ..config import OPTIONS, SlothConfig
from .config import LORA, SLOTH_MEANINGS, TRAINING, default_run_config
from .datasets import FORMATS, DatasetError, columns, guess_mapping, length_stats, load_rows, to_texts
from .form import MAPPING_FIELDS, SLOTH_TEXT_KEYS, config_to_fields, field_names, fields_to_config
from .runs import RunManager, StudioError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CHOICES = {**{f"sloth.{o.name}": o.choices for o in OPTIONS if o.kind == "choice"},
           "method": ("lora", "qlora", "full"), "training.precision": ("fp32", "bf16", "fp16"),
           "mapping.format": tuple(FORMATS)}


def parse_auth(auth: Optional[str]) -> Optional[Tuple[str, str]]:
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise StudioError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


def check_bind(host: str, auth: Optional[str]) -> Optional[Tuple[str, str]]:
    """The (user, password) to require; listening beyond this machine without one is refused."""
    credentials = parse_auth(auth)
    if host not in LOCAL_HOSTS and credentials is None:
        raise StudioError(f"--host {host} makes the studio reachable from other machines (it starts training "
                          f"processes and reads local folders): give --auth USER:PASSWORD too")
    return credentials


def _component(gr, name: str, value: Any):
    section, _, key = name.rpartition(".")
    info = {"sloth": SLOTH_MEANINGS.get(key), "training": TRAINING.get(key, (None, None))[1]}.get(section)
    common = dict(label=key.replace("_", " "), info=info, elem_id=name.replace(".", "-"))   # training-max_steps
    if name in CHOICES:
        return gr.Dropdown(list(CHOICES[name]), value=value, **common)
    if section == "sloth" and key in SLOTH_TEXT_KEYS:
        return gr.Textbox(value=value, placeholder="empty: default", **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **common)
    if isinstance(value, (int, float)):
        return gr.Number(value=value, **common)
    return gr.Textbox(value=value if value is not None else "", **common)


def build_app(manager: RunManager, model: str = ""):
    import gradio as gr
    import pandas as pd

    from . import hardware
    from .chat import ChatModels

    chats = ChatModels()
    names = field_names()
    defaults = config_to_fields({**default_run_config(model), "model": model})
    comps: Dict[str, Any] = {}

    with gr.Blocks(title="sloth studio") as app:
        gr.Markdown("# sloth studio\nTrain a causal LM with TRL `SFTTrainer` + `SlothCallback`; each run is a "
                    f"subprocess with its own folder in `{manager.runs_dir}`.")
        dataset_path = gr.State("")
        with gr.Tab("Dataset"):
            with gr.Row():
                upload = gr.File(label="upload JSONL / JSON / CSV / Parquet", file_types=[".jsonl", ".json", ".csv",
                                                                                           ".parquet"])
                local = gr.Textbox(label="or a local file / saved `datasets` folder", elem_id="local-dataset")
            load_btn = gr.Button("Load", elem_id="load-dataset")
            data_msg = gr.Markdown(elem_id="dataset-message")
            preview = gr.Dataframe(label="first rows", interactive=False)
            with gr.Row():
                comps["mapping.format"] = _component(gr, "mapping.format", defaults["mapping.format"])
                for field in MAPPING_FIELDS:
                    comps[f"mapping.{field}"] = gr.Dropdown([""], value="", label=field, allow_custom_value=True)
            check_btn = gr.Button("Render and measure")
            rendered = gr.Textbox(label="first row as training text", lines=6)
            histogram = gr.BarPlot(x="tokens", y="rows", label="token lengths")
        with gr.Tab("Model"):
            comps["name"] = gr.Textbox(label="run name")
            comps["model"] = gr.Textbox(value=model, label="model folder (or hub id where a network exists)",
                                        elem_id="model-folder")
            comps["method"] = _component(gr, "method", defaults["method"])
            with gr.Row():
                for key in LORA:
                    comps[f"lora.{key}"] = _component(gr, f"lora.{key}", defaults[f"lora.{key}"])
            gr.Markdown("### Hardware, and what this run will need")
            hw_devices = gr.Textbox(value=hardware.devices_text(), label="GPUs (free memory at the last estimate)",
                                    interactive=False, elem_id="hw-devices")
            estimate_btn = gr.Button("Estimate memory and PatchReport (measures one layer on the CPU)",
                                     elem_id="estimate")
            estimate_md = gr.Markdown(elem_id="memory-estimate")
            estimate_report = gr.Textbox(label="PatchReport this run would get", lines=12, elem_id="run-report")
        with gr.Tab("Plugin options"):
            for key in SlothConfig().to_dict():
                comps[f"sloth.{key}"] = _component(gr, f"sloth.{key}", defaults[f"sloth.{key}"])
            report_btn = gr.Button("PatchReport for this model")
            report_preview = gr.Textbox(label="what the run would get patched", lines=12)
        with gr.Tab("Training"):
            for key in TRAINING:
                comps[f"training.{key}"] = _component(gr, f"training.{key}", defaults[f"training.{key}"])
        with gr.Tab("Runs"):
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start-run")
                stop_btn = gr.Button("Stop", elem_id="stop-run")
                resume_btn = gr.Button("Resume")
            run_pick = gr.Dropdown(label="run", choices=[], allow_custom_value=True, elem_id="run-pick")
            run_msg = gr.Markdown(elem_id="run-status")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", label="loss", elem_id="loss-plot")
                lr_plot = gr.LinePlot(x="step", y="learning_rate", label="learning rate")
            with gr.Row():
                tps_plot = gr.LinePlot(x="step", y="tokens_per_s", label="tokens/s")
                mem_plot = gr.LinePlot(x="step", y="peak_memory_gb", label="peak memory (GiB)")
            log_tail = gr.Textbox(label="log", lines=12, max_lines=12, autoscroll=True)
            patch_text = gr.Textbox(label="PatchReport", lines=10)
            gr.Markdown("### Compare two runs")
            with gr.Row():
                compare_a = gr.Dropdown(label="run A", choices=[], allow_custom_value=True)
                compare_b = gr.Dropdown(label="run B", choices=[], allow_custom_value=True)
                compare_btn = gr.Button("Compare loss")
            compare_plot = gr.LinePlot(x="step", y="loss", color="run", label="loss of both runs",
                                       elem_id="compare-plot")
            gr.Markdown("### Export")
            with gr.Row():
                export_btn = gr.Button("Export as code")
                zip_btn = gr.Button("Adapter as .zip", elem_id="zip-adapter")
                merge_btn = gr.Button("Merge the adapter into the model")
            with gr.Row():
                adapter_file = gr.File(label="adapter download", elem_id="adapter-file")
                merge_msg = gr.Markdown()
            script_code = gr.Code(language="python", label="the same run as a Python script")
            yaml_code = gr.Code(language="yaml", label="the same run for Axolotl")
            timer = gr.Timer(1.0)
        with gr.Tab("Chat"):
            gr.Markdown("The selected run's adapter on its base model, and the base model alone (adapter "
                        "disabled), answering the same message.")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                max_tokens = gr.Slider(1, 1024, value=64, step=1, label="max new tokens")
            message = gr.Textbox(label="message", elem_id="chat-message")
            send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
            with gr.Row():
                tuned_answer = gr.Textbox(label="fine-tuned (base + adapter)", lines=8, elem_id="chat-tuned")
                base_answer = gr.Textbox(label="base model", lines=8, elem_id="chat-base")

        inputs = [comps[n] for n in names]

        def form(values) -> Dict[str, Any]:
            return fields_to_config(dict(zip(names, values)))

        def on_load(file, path):
            path = file if file else (path or "").strip()
            if not path:
                return "", "Upload a file or give a path.", None, *[gr.update()] * (1 + len(MAPPING_FIELDS))
            try:
                rows = load_rows(path)
            except DatasetError as exc:
                return "", f"**Cannot use this dataset:** {exc}", None, *[gr.update()] * (1 + len(MAPPING_FIELDS))
            cols = columns(rows)
            guess = guess_mapping(cols)
            updates = [gr.update(value=guess["format"])]
            updates += [gr.update(choices=[""] + cols, value=guess.get(f) or "") for f in MAPPING_FIELDS]
            frame = pd.DataFrame([{c: str(r.get(c))[:200] for c in cols} for r in rows[:5]])
            return path, f"{len(rows)} rows, columns: {', '.join(cols)}", frame, *updates

        load_btn.click(on_load, [upload, local], [dataset_path, data_msg, preview, comps["mapping.format"]]
                       + [comps[f"mapping.{f}"] for f in MAPPING_FIELDS])

        def on_check(path, *values):
            try:
                config = form(values)
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(config["model"])
                texts = to_texts(load_rows(path), config["dataset"]["mapping"], tokenizer)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                return str(exc), None, f"**Cannot map:** {exc}"
            stats = length_stats(texts, tokenizer, config["training"]["max_length"])
            bars = pd.DataFrame({"tokens": [str(e) for e in stats["edges"][:-1]], "rows": stats["counts"]})
            return texts[0], bars, (f"{len(texts)} rows, mean {stats['mean']:.0f} tokens, max {stats['max']}; "
                                    f"**{stats['cut']}** rows longer than max_length {stats['max_length']} are cut")

        check_btn.click(on_check, [dataset_path] + inputs, [rendered, histogram, data_msg])

        def on_report(*values):
            from ..doctor import DoctorError, patch_report
            try:
                config = form(values)
                return str(patch_report(config["model"], SlothConfig(**config["sloth"])))
            except (DoctorError, ValueError) as exc:
                return f"cannot build the report: {exc}"

        report_btn.click(on_report, inputs, report_preview)

        def on_estimate(*values):
            from ..doctor import DoctorError
            try:
                config = form(values)
            except ValueError as exc:
                return f"**Cannot estimate:** {exc}", "", hardware.devices_text()
            try:
                estimate = hardware.estimate_memory(config).summary()
            except (DoctorError, ValueError, OSError) as exc:
                estimate = f"**Cannot estimate:** {exc}"
            try:
                report = hardware.run_patch_report(config)
            except (DoctorError, ValueError) as exc:
                report = f"cannot build the report: {exc}"
            return estimate.replace("\n", "  \n"), report, hardware.devices_text()

        estimate_btn.click(on_estimate, inputs, [estimate_md, estimate_report, hw_devices])

        def run_choices(selected=None):
            runs = manager.list()
            choices = [(f"{r['name']} ({r['state']})", r["id"]) for r in runs]
            return gr.update(choices=choices, value=selected or (runs[0]["id"] if runs else None))

        def on_start(path, *values):
            try:
                if not path:
                    raise StudioError("load a dataset first (Dataset tab)")
                run_id = manager.create(form(values), path)
                manager.start(run_id)
            except (StudioError, ValueError) as exc:
                return run_choices(), f"**Not started:** {exc}"
            return run_choices(run_id), f"run {run_id} started"

        start_btn.click(on_start, [dataset_path] + inputs, [run_pick, run_msg])

        def on_stop(run_id):
            try:
                manager.stop(run_id)
                return f"run {run_id}: stopping (saving a checkpoint and the adapter)"
            except StudioError as exc:
                return f"**{exc}**"

        stop_btn.click(on_stop, run_pick, run_msg)

        def on_resume(run_id):
            try:
                manager.start(run_id, resume=True)
                return f"run {run_id}: resumed from its last checkpoint"
            except StudioError as exc:
                return f"**{exc}**"

        resume_btn.click(on_resume, run_pick, run_msg)

        shown_state = gr.State("")   # the run's state when the run list was last refreshed

        def on_tick(run_id, shown):
            if not run_id:
                return [gr.update()] * 8 + [shown]
            try:
                status = manager.status(run_id)
            except StudioError:
                return [gr.update()] * 8 + [shown]
            frame = pd.DataFrame(manager.metrics(run_id) or [], columns=["step", "loss", "learning_rate",
                                                                         "tokens_per_s", "peak_memory_gb"])
            steps = f", step {int(frame['step'].iloc[-1])}" if len(frame) else ""
            text = f"run {run_id}: **{status['state']}**{steps}" + (f" — {status['error']}" if status.get("error")
                                                                      else "")
            state = f"{run_id}:{status['state']}"
            pick = run_choices(run_id) if state != shown else gr.update()   # the list's labels show the state
            return (text, frame, frame, frame, frame, manager.log_tail(run_id), manager.patch_report(run_id), pick,
                    state)

        timer.tick(on_tick, [run_pick, shown_state], [run_msg, loss_plot, lr_plot, tps_plot, mem_plot, log_tail,
                                                      patch_text, run_pick, shown_state])

        def on_export(run_id):
            from .export import axolotl_yaml, python_script
            try:
                config = manager.config(run_id)
                run_dir = manager.run_dir(run_id)
            except StudioError as exc:
                return f"# {exc}", ""
            return (python_script(config, os.path.join(run_dir, config["dataset"]["file"])),
                    axolotl_yaml(config, os.path.join(run_dir, "data", "train_text.jsonl")))

        export_btn.click(on_export, run_pick, [script_code, yaml_code])

        def on_compare(run_a, run_b):
            try:
                rows = manager.loss_curves([run_a, run_b])
            except StudioError as exc:
                raise gr.Error(str(exc)) from None
            return pd.DataFrame(rows, columns=["step", "loss", "run"])

        compare_btn.click(on_compare, [compare_a, compare_b], compare_plot)

        def on_zip(run_id):
            from .export import adapter_zip
            try:
                return adapter_zip(manager.run_dir(run_id))
            except StudioError as exc:
                raise gr.Error(str(exc)) from None

        zip_btn.click(on_zip, run_pick, adapter_file)

        def on_merge(run_id):
            from .export import merge_adapter
            try:
                return f"merged model saved to `{merge_adapter(manager.run_dir(run_id), manager.config(run_id))}`"
            except StudioError as exc:
                return f"**{exc}**"

        merge_btn.click(on_merge, run_pick, merge_msg)

        def on_send(run_id, text, temp, p, tokens):
            try:
                run_dir = manager.run_dir(run_id)
                for tuned, base in chats.side_by_side(run_dir, manager.config(run_id), text, temperature=temp,
                                                      top_p=p, max_new_tokens=tokens):
                    yield tuned, base
            except StudioError as exc:
                raise gr.Error(str(exc)) from None

        send_btn.click(on_send, [run_pick, message, temperature, top_p, max_tokens], [tuned_answer, base_answer])

        def all_choices(selected=None):
            runs = manager.list()
            choices = [(f"{r['name']} ({r['state']})", r["id"]) for r in runs]
            return gr.update(choices=choices)

        app.load(lambda: (run_choices(), all_choices(), all_choices()), None, [run_pick, compare_a, compare_b])
        run_msg.change(lambda: (all_choices(), all_choices()), None, [compare_a, compare_b])
    return app


def launch(runs_dir: str, host: str = "127.0.0.1", port: int = 7860, auth: Optional[str] = None,
           model: str = "", block: bool = True):
    credentials = check_bind(host, auth)
    manager = RunManager(runs_dir)
    uploads = os.path.join(manager.runs_dir, ".uploads")
    try:
        os.makedirs(uploads, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"cannot write to the runs dir {manager.runs_dir}: {exc.strerror or exc}") from None
    os.environ["GRADIO_TEMP_DIR"] = uploads   # uploads stay inside the runs folder
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(manager, model=model)
    app.launch(server_name=host, server_port=port, auth=credentials, prevent_thread_lock=not block,
               allowed_paths=[manager.runs_dir], quiet=not block)
    return app
