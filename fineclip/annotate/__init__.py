"""Region-text data of one's own: images → box proposals → region captions → the training schema
(``python -m fineclip.annotate``), and the import of FineCLIP's released region files."""
