"""Thin entry point (the same as the installed ``reddiff-run``): compose the config, run one job, write its
outputs into the Hydra job dir.

    python run.py                                   # task=sr4 sampler=reddiff on the embedded prior + demo data
    python run.py -m task=sr4,inpaint_box sampler=reddiff,dps,pigdm,ddrm
    python run.py -m +experiment=demo_table1
"""
from reddiff.run.entry import main

if __name__ == "__main__":
    main()
