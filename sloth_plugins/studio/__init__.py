"""``sloth studio``: a local web app that configures, starts and watches training runs.

The app is a client of the library: each run is a subprocess (``worker.py``) running TRL
``SFTTrainer`` + ``SlothCallback``; ``runs.py`` manages the run folders, ``datasets.py`` reads and
maps the data, ``export.py`` prints the same run as a Python script or an Axolotl YAML, and
``app.py`` is the Gradio UI (the ``[studio]`` extra).
"""
