"""From what users give to what the model takes: images (``images``), LLaVA-UHD slicing
(``slicing``), conversation templates (``conversation``) and the processor that lays prompts out
(``processor``)."""
