"""Human evaluation: a blind study of two runs' replies to the same prompts (`hybridlm eval human
build`), a small page where people rate them (`... serve`), and win rates or mean ratings with
confidence intervals (`... report`). Everything lives in one SQLite file per study."""
