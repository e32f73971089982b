# The wall-clock form of the default (synthetic 'track' videos, 2-core CPU): 600 s of training time rather than a
# fixed number of steps; the LR decays on whichever of steps and seconds is further along, so a slow machine still
# ends on a fully decayed LR. Not step-exact: the step reached depends on the machine.
# python train_foveated.py config/foveated_synthetic.py
max_steps = 4000
max_train_seconds = 600.0
