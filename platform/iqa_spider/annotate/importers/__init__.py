"""Bring existing sets into the dataset contract (`iqa-spider data import ...`,
docs/datasets-standard.md): one module per published layout (koniq, spaq, kadid, tid2013), any
(image, MOS) table (mos_table), and a table of labelled distortions (labelled). Rated sets share
one writer (ratings): the scale's mapping onto 1..5, the split by source, the import's record."""
