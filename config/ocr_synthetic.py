# The default run with the timed budget of the earlier speedruns: up to 9000 steps, stopped after 750 training
# seconds, the LR decaying on steps or seconds, whichever is further along (a quiet 2-core CPU made ~6,800 steps
# when the budget also counted the evals; it now counts training steps only).
# Not step-exact: the step count follows the machine's speed. (The script's default: 6800 steps, no cap.)
#   python train_ocr.py config/ocr_synthetic.py
max_steps = 9000
max_train_seconds = 750.0
