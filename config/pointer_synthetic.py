# The CPU speedrun form of the default (synthetic referring scenes): train for 540 s of training time rather
# than a fixed number of steps; the LR decays on whichever of steps and seconds is further along, so a slow
# machine still ends on a fully decayed LR. Not step-exact: the step reached depends on the machine.
# python train_pointer.py config/pointer_synthetic.py
max_train_seconds = 540.0
max_steps = 2200              # an upper bound the budget normally stops first
