"""The model: configuration, the LLaVA-Meteor model, its vision tower and visual experts, the
vision-to-language projectors (``projectors/top_down``: the paper's Top-Down Compression) and the ops
they run on (``ops``: the selective scan).

Nothing here imports the trainer, the evaluation, the server or the demo.
"""
