# The wall-clock form of the default (synthetic roads, 2-core CPU), the budget the earlier speedruns trained on:
# 540 s of training time rather than a fixed number of steps, the LR decaying on whichever of steps and seconds is
# further along, so a slow machine still ends on a fully decayed LR. Not step-exact: the step reached depends on
# the machine (a quiet 2-core CPU: ~4,300). The script's default: 4300 steps, no cap.
#   python train_lanelm.py config/lanelm_synthetic.py
max_steps = 5200             # an upper bound the budget normally stops first
max_train_seconds = 540.0
eval_interval = 5200         # one eval, at the end
