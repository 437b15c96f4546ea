"""fid: score EMA checkpoints with torch-fidelity, in three parts as EDM2 splits them: ref (reference.py), gen
(sampling.py, Ray actors) and calc (score.py, and the stage); classifier.py is the extractor that needs no download.
"""
